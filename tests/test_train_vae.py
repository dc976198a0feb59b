"""train_vae: a short run learns colours, and the folded per-channel standardisation is exact and loads in diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lesiongen.diffusion.train_vae import TrainVAEConfig, load_images, standardise_latent_channels, train_vae
from lesiongen.errors import InputError


@pytest.fixture(scope="module")
def images(d7p_small_train: Path) -> torch.Tensor:
    return load_images(d7p_small_train / "images", 32)


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
