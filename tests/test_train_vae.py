"""train_vae: a short run learns colours, and the folded per-channel standardisation is exact and loads in diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lesiongen.diffusion.tiny import build_components
from lesiongen.diffusion.train_vae import (
    TrainVAEConfig,
    class_weights,
    colour_whitening,
    fold_colour_transform,
    load_images,
    standardise_latent_channels,
    train_vae,
    training_images,
)
from lesiongen.errors import InputError


@pytest.fixture(scope="module")
def images(d7p_small_train: Path) -> torch.Tensor:
    return load_images(training_images(d7p_small_train / "images"), 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_dir: Path, d7p_small_train: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vae") / "vae"
    summary = train_vae(
        TrainVAEConfig(
            pretrained_model_name_or_path=str(tiny_sd_dir),
            train_data_dir=str(d7p_small_train / "images"),
            output_dir=str(out),
            resolution=32,
            max_train_steps=40,
            train_batch_size=4,
        )
    )
    return out, summary


def test_standardising_channels_keeps_reconstructions_and_gives_unit_latents(tiny_sd_dir, images):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd_dir / "vae").eval()
    with torch.no_grad():
        vae.quant_conv.bias[4:] -= 6.0  # a narrow posterior, as training gives
        vae.quant_conv.weight[1] *= 5.0  # an unbalanced channel, as a briefly trained VAE has
        vae.quant_conv.bias[2] += 3.0  # and an offset one
        before = vae.decode(vae.encode(images).latent_dist.mode()).sample
    mean, std = standardise_latent_channels(vae, images, seed=0)
    assert std[1] > 2 * std[0] and abs(mean[2]) > 1.0
    with torch.no_grad():
        after = vae.decode(vae.encode(images).latent_dist.mode()).sample
        z = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    flat = z.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(4), atol=1e-4, rtol=0)


def test_short_training_learns_colours_and_saves_a_standardised_vae(trained, images):
    from diffusers import AutoencoderKL

    out, summary = trained
    assert summary["colour_error_after"] < 0.7 * summary["colour_error_before"]
    assert summary["colour_error_after_standardising"] == pytest.approx(summary["colour_error_after"], abs=0.05)
    saved = json.loads((out / "train_vae.json").read_text())
    assert saved["folded_channel_std"] == pytest.approx(summary["folded_channel_std"])
    vae = AutoencoderKL.from_pretrained(out).eval()
    assert vae.config.scaling_factor == 1.0
    with torch.no_grad():
        z = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    stds = z.transpose(0, 1).reshape(4, -1).std(1)
    assert float(stds.min()) > 0.6 and float(stds.max()) < 1.6  # ~1 on held-out sampling noise, not 0.2 vs 1.4


def test_a_folder_without_a_vae_is_refused(tmp_path, d7p_small_train):
    with pytest.raises(InputError, match="config.json"):
        TrainVAEConfig(pretrained_model_name_or_path=str(tmp_path), train_data_dir=str(d7p_small_train))


def test_an_output_folder_that_is_not_a_vae_is_never_replaced(tmp_path, tiny_sd_dir, d7p_small_train):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="--output_dir .*results: exists and is not a VAE folder"):
        TrainVAEConfig(
            pretrained_model_name_or_path=str(tiny_sd_dir),
            train_data_dir=str(d7p_small_train),
            output_dir=str(tmp_path / "results"),
        )
    TrainVAEConfig(  # a VAE folder (here the pipeline's own) is what --output_dir may replace
        pretrained_model_name_or_path=str(tiny_sd_dir),
        train_data_dir=str(d7p_small_train),
        output_dir=str(tiny_sd_dir / "vae"),
    )


def test_folding_the_colour_whitening_is_exact():
    """A VAE trained on whitened colour in and out, once folded, reads and writes RGB with the same outputs."""
    vae = build_components(32, 0, "tiny", latent_channels=8, norm_groups=8)["vae"].eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    w = colour_whitening(x * torch.tensor([1.0, 0.3, 0.2]).view(1, 3, 1, 1), 0.5)
    assert not torch.allclose(w, torch.eye(3), atol=0.1)  # the narrow colour axes are scaled up
    with torch.no_grad():
        z = vae.encode(torch.einsum("ij,bjhw->bihw", w, x)).latent_dist.mode()
        expected = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(w), vae.decode(z).sample)
        fold_colour_transform(vae, w)
        folded_z = vae.encode(x).latent_dist.mode()
        got = vae.decode(folded_z).sample
    torch.testing.assert_close(folded_z, z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_class_weights_give_every_label_the_same_mass(d7p_small_train, tmp_path):
    rows = [json.loads(line) for line in (d7p_small_train / "metadata.jsonl").read_text().splitlines()]
    (tmp_path / "images").mkdir()
    lines = []
    for i, row in enumerate(rows[:4]):  # three images labelled "a", one labelled "b"
        (tmp_path / row["file_name"]).symlink_to((d7p_small_train / row["file_name"]).resolve())
        lines.append(json.dumps({"file_name": row["file_name"], "label": "b" if i == 3 else "a"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    paths = training_images(tmp_path)
    weights = class_weights(tmp_path, paths)
    by_label = {"a": 0.0, "b": 0.0}
    for path, w in zip(paths, weights, strict=True):
        by_label["b" if path.name == Path(rows[3]["file_name"]).name else "a"] += w
    assert by_label == pytest.approx({"a": 1.0, "b": 1.0})


def test_the_faithfulness_options_train_a_vae_that_reads_and_writes_rgb(tmp_path, d7p_small_train):
    """Class-balanced, lesion-weighted, whitened training with whole-image last steps, on an 8-channel VAE:
    colours improve and the saved VAE (whitening folded in) reconstructs RGB as well as the summary says."""
    from diffusers import AutoencoderKL

    from lesiongen.diffusion.tiny import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "model", resolution=32, latent_channels=8, norm_groups=8, zero_snr=True)
    summary = train_vae(
        TrainVAEConfig(
            pretrained_model_name_or_path=str(model),
            train_data_dir=str(d7p_small_train),
            resolution=32,
            max_train_steps=40,
            train_batch_size=4,
            crop_size=16,
            full_size_steps=10,
            lesion_weight=4.0,
            balance_classes=True,
            whiten_strength=0.5,
        )
    )
    assert summary["colour_error_after"] < 0.7 * summary["colour_error_before"]
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    assert vae.config.latent_channels == 8
    x = load_images(training_images(d7p_small_train), 32)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    error = float((rec.mean((2, 3)) - x.mean((2, 3))).abs().mean() * 127.5)
    assert error == pytest.approx(summary["colour_error_after_standardising"], rel=0.25, abs=1.0)


def test_balance_classes_needs_a_metadata_file(tiny_sd_dir, d7p_small_train):
    with pytest.raises(InputError, match="--balance_classes.*no metadata.jsonl"):
        TrainVAEConfig(
            pretrained_model_name_or_path=str(tiny_sd_dir),
            train_data_dir=str(d7p_small_train / "images"),
            balance_classes=True,
        )
