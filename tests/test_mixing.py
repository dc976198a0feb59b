"""Mixing recipes of a real + synthetic classifier: shares, loss weight, real-anchored swaps, two stages, and
separate BatchNorm statistics, each trained for a few steps on real Derm7pt images (issue 34)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import write_manifest
from PIL import Image
from test_classify import assert_timm_loads_the_classifier
from test_classify import quick as classify_quick
from torchvision.transforms import v2

from lesiongen import labels
from lesiongen.captions.analyze import surrounding_ita
from lesiongen.classify.compare import CompareConfig, compare, matched_epochs
from lesiongen.classify.config import ClassifyConfig
from lesiongen.classify.data import TrainingImages, lesion_masks, make_transform
from lesiongen.classify.dual_bn import DualBatchNorm2d
from lesiongen.classify.evaluate import EvalConfig, evaluate
from lesiongen.classify.mixing import epoch_frame
from lesiongen.classify.models import LAST, build_model, load_classifier
from lesiongen.classify.train import (
    classification_loss,
    make_train_loader,
    start_from,
    steps_per_epoch,
    train,
    train_epoch,
)
from lesiongen.errors import InputError
from lesiongen.images import open_rgb
from lesiongen.states import read_state, write_state
from lesiongen.tables import read_image_table


def quick(data_dir: Path, out: Path, **kw) -> ClassifyConfig:
    """test_classify's quick settings, with batches large enough to hold real and synthetic images together."""
    return classify_quick(data_dir, out, **{"batch_size": 64, **kw})


@pytest.fixture(scope="module")
def variants(tmp_path_factory, small_d7p: Path) -> Path:
    """A generate.py --mode augment-shaped manifest: two variants of every real training image, their sources
    spelled relative to the manifest for one half and absolute for the other, plus one variant of a
    validation image, which no run may train on."""
    train_rows = read_image_table(small_d7p, "train")
    val_row = read_image_table(small_d7p, "validation").iloc[0]
    sources = [p for p in train_rows["path"] for _ in range(2)] + [val_row["path"]]
    rows = [
        {"label": label, "pixels": np.asarray(Image.open(p).convert("RGB").resize((40, 40)))}
        for p, label in zip(sources, [*np.repeat(train_rows["label"], 2), val_row["label"]], strict=True)
    ]
    folder = write_manifest(tmp_path_factory.mktemp("augment") / "variants", rows)
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["source"] = [os.path.relpath(p, folder) if i % 2 else p for i, p in enumerate(sources)]
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder


def synthetic_frame(n: int, origin: str = "synthetic", **columns) -> pd.DataFrame:
    codes = [labels.CODES[i % 3] for i in range(n)]
    return pd.DataFrame({"path": [f"{origin}{i}.png" for i in range(n)], "label": codes, "origin": origin, **columns})


def test_swap_replaces_a_real_image_by_its_own_variant_at_the_asked_rate():
    real = synthetic_frame(1000, "real")
    variants = synthetic_frame(2000, source_row=np.repeat(np.arange(1000), 2))
    variants["label"] = np.repeat(real["label"], 2).to_numpy()
    frame = pd.concat([real, variants], ignore_index=True)
    cfg = ClassifyConfig(data_dir="d", synthetic_dir="s", train="mixed", swap_probability=0.3, epochs=4)
    rates = []
    for epoch in range(4):
        chosen = epoch_frame(frame, cfg, epoch)
        assert len(chosen) == 1000 and chosen["label"].tolist() == real["label"].tolist()
        swapped = chosen[chosen["origin"] == "synthetic"]
        assert (swapped["source_row"].to_numpy() == swapped.index.to_numpy()).all()  # its own variant
        rates.append(len(swapped) / 1000)
    assert np.mean(rates) == pytest.approx(0.3, abs=0.02) and len(set(rates)) > 1  # redrawn each epoch
    assert epoch_frame(frame, cfg, 2).equals(epoch_frame(frame, cfg, 2))  # a resumed run draws the same


def test_swap_trains_on_variants_of_training_images_only(tmp_path, small_d7p, variants, capsys):
    n_real = len(read_image_table(small_d7p, "train"))
    cfg = quick(small_d7p, tmp_path / "swap", train="mixed", synthetic_dir=str(variants), swap_probability=0.5)
    run = train(cfg)["runs"][0]
    assert run["n_train"] == {"real": n_real, "synthetic": 2 * n_real}  # the validation image's variant is out
    assert "left out 1 synthetic variant(s) whose 'source' is not a real training image" in " ".join(
        json.loads((tmp_path / "swap" / "data_report.json").read_text())["notes"]
    )
    assert 0.2 * n_real < run["history"][0]["synthetic_images"] < 0.8 * n_real
    assert f"{2 * n_real} variants of {n_real} of {n_real} real training images" in capsys.readouterr().out
    fake = tmp_path / "no-sources"
    write_manifest(fake, [{"label": "nv"}, {"label": "mel"}])
    with pytest.raises(InputError, match="--swap_probability: no synthetic image names a real training image"):
        train(quick(small_d7p, tmp_path / "x", train="mixed", synthetic_dir=str(fake), swap_probability=0.5))


def test_synthetic_share_per_batch_and_per_epoch(tmp_path, small_d7p, fake_generation):
    n_real = len(read_image_table(small_d7p, "train"))
    mixed = dict(train="mixed", synthetic_dir=str(fake_generation), synthetic_share=0.25)
    per_batch = train(quick(small_d7p, tmp_path / "b", share_per="batch", batch_size=8, epochs=2, **mixed))
    # 2 of 8 images per batch are synthetic; an epoch is one pass over the real images in batches of 6 real
    assert [h["synthetic_images"] for h in per_batch["runs"][0]["history"]] == [2 * (n_real // 6)] * 2
    per_epoch = train(quick(small_d7p, tmp_path / "e", **mixed))
    assert per_epoch["runs"][0]["history"][0]["synthetic_images"] == round(n_real * 0.25 / 0.75)


def test_synthetic_weight_multiplies_the_synthetic_terms(tmp_path, small_d7p, fake_generation):
    logits, y = torch.randn(6, len(labels.CODES)), torch.tensor([0, 1, 2, 0, 1, 2])
    synthetic = torch.tensor([False, False, False, True, True, True])
    terms = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    for weight in (0.0, 0.5, 2.0):
        expected = (terms[:3].sum() + weight * terms[3:].sum()) / 6
        assert classification_loss(logits, y, synthetic, None, weight) == pytest.approx(float(expected), rel=1e-6)
    class_weight = torch.linspace(0.5, 2.0, len(labels.CODES))
    plain = torch.nn.functional.cross_entropy(logits, y, weight=class_weight)
    assert torch.equal(classification_loss(logits, y, synthetic, class_weight, 1.0), plain)
    # trained: weight 0 leaves a model fed synthetic images only exactly where it was (no weight decay)
    cfg = quick(small_d7p, tmp_path / "w", train="mixed", synthetic_dir=str(fake_generation), weight_decay=0.0)
    frame = read_image_table(fake_generation).assign(origin="synthetic")
    loader = torch.utils.data.DataLoader(TrainingImages(frame, 32, make_transform(32)), batch_size=8)
    for weight, moves in ((0.0, False), (1.0, True)):
        torch.manual_seed(0)
        model = build_model(cfg)
        before = model.conv1.weight.detach().clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        run_cfg = quick(small_d7p, tmp_path / "w", train="mixed", synthetic_dir="s", synthetic_weight=weight)
        _, seen = train_epoch(
            model, loader, optimizer, None, torch.amp.GradScaler("cpu", enabled=False), "cpu", run_cfg, ""
        )
        assert seen == len(frame) and (not torch.equal(model.conv1.weight, before)) == moves


def test_two_stages_then_real_only_and_the_yardstick_gets_as_many_epochs(tmp_path, small_d7p, fake_generation):
    out = tmp_path / "cmp"
    result = compare(
        CompareConfig(
            data_dir=str(small_d7p),
            synthetic_dir=str(fake_generation),
            output_dir=str(out),
            image_size=32,
            epochs=2,
            finetune_epochs=1,
            batch_size=64,
            pretrained=False,
            num_workers=0,
        )
    )
    history = {
        r["train"]: json.loads((out / f"{r['train']}-seed0" / "summary.json").read_text())["history"]
        for r in result["runs"]
    }
    assert [h["stage"] for h in history["mixed"]] == ["pretrain", "pretrain", "finetune"]
    assert [h["synthetic_images"] > 0 for h in history["mixed"]] == [True, True, False]
    assert len(history["real"]) == 3 and len(history["synthetic"]) == 2  # real only: both stages' epochs
    assert all(h["synthetic_images"] > 0 for h in history["synthetic"])  # synthetic only stays synthetic
    assert result["recipe"] == {"finetune_epochs": 1}
    assert "Real + synthetic recipe: finetune_epochs=1." in (out / "compare.md").read_text()


def test_init_from_starts_the_mixed_run_from_the_synthetic_only_run(tmp_path, small_d7p, fake_generation, capsys):
    out = tmp_path / "cmp"
    settings = dict(data_dir=str(small_d7p), synthetic_dir=str(fake_generation), output_dir=str(out), image_size=32)
    settings |= dict(epochs=1, batch_size=64, pretrained=False, num_workers=0, runs=["real", "mixed", "synthetic"])
    result = compare(CompareConfig(**settings, init_from="synthetic"))
    log = capsys.readouterr().out
    start = out / "synthetic-seed0" / LAST
    # the synthetic-only run trains first, whatever --runs' order; the mixed run starts from its last epoch
    assert log.index("synthetic-seed0: training") < log.index("mixed-seed0: training")
    assert log.index("mixed-seed0: training") < log.index(f"starting from the weights of {start}")
    assert log.count("starting from the weights") == 1
    _, mixed_cfg, _ = load_classifier(out / "mixed-seed0" / LAST)
    _, real_cfg, _ = load_classifier(out / "real-seed0" / LAST)
    assert mixed_cfg.init_from == str(start) and real_cfg.init_from is None
    assert result["recipe"] == {"init_from": "synthetic"}
    assert "Real + synthetic recipe: init_from=synthetic." in (out / "compare.md").read_text()
    # the run resumes as it was started, and refuses to go on from other weights
    with pytest.raises(InputError, match="--init_from"):
        train(
            quick(
                small_d7p,
                out / "mixed-seed0",
                train="mixed",
                synthetic_dir=str(fake_generation),
                image_size=32,
                resume_from_checkpoint="latest",
                init_from=str(out / "real-seed0" / LAST),
            )
        )
    # the paper experiment trains the synthetic-only run first, in its own call; without it, one line before training
    elsewhere = {**settings, "runs": ["mixed"], "output_dir": str(tmp_path / "other")}
    with pytest.raises(InputError, match="--init_from synthetic: .*other/synthetic-seed0/last.safetensors not found"):
        compare(CompareConfig(**elsewhere, init_from="synthetic"))
    assert not (tmp_path / "other" / "mixed-seed0").exists()
    with pytest.raises(InputError, match="--init_from synthetic: each fold would need its own synthetic-only run"):
        CompareConfig(**settings, init_from="synthetic", folds=2)


def test_init_from_loads_the_weights_and_refuses_what_does_not_fit(tmp_path, small_d7p, fake_generation):
    train(quick(small_d7p, tmp_path / "synth", train="synthetic", synthetic_dir=str(fake_generation)))
    saved = read_state(tmp_path / "synth" / LAST, "retrain")["model"]
    model = build_model(quick(small_d7p, tmp_path / "x", train="mixed", synthetic_dir="s", synthetic_bn=True))
    start_from(model, tmp_path / "synth" / LAST)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # every saved weight, the BatchNorm twins apart
    assert any(".aux." in k for k in set(state) - set(saved))
    for path, message in (
        (tmp_path / "synth", "is a folder"),
        (tmp_path / "nowhere.safetensors", "not found"),
    ):
        with pytest.raises(InputError, match=message):
            start_from(model, path)
    # the weights come from --init_from, so no ImageNet weights are fetched (the tests are offline: that would fail)
    train(quick(small_d7p, tmp_path / "on", pretrained=True, init_from=str(tmp_path / "synth" / LAST)))
    vit = build_model(quick(small_d7p, tmp_path / "v", model="vit", vit_name="vit_tiny_patch16_224"))
    with pytest.raises(InputError, match="--init_from: .* holds a resnet18 at 32 px whose weights do not fit"):
        start_from(vit, tmp_path / "synth" / LAST)


def bn_stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}


def test_synthetic_batches_leave_the_real_batchnorm_statistics_alone(tmp_path, small_d7p, fake_generation):
    cfg = quick(small_d7p, tmp_path / "bn", train="mixed", synthetic_dir=str(fake_generation), synthetic_bn=True)
    model = build_model(cfg)
    assert sum(isinstance(m, DualBatchNorm2d) for m in model.modules()) == 20  # every BatchNorm of a ResNet18
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for origin, table in (("synthetic", fake_generation), ("real", small_d7p)):
        frame = read_image_table(table, "train" if origin == "real" else None).assign(origin=origin)
        loader = torch.utils.data.DataLoader(TrainingImages(frame, 32, make_transform(32)), batch_size=16)
        before = bn_stats(model)
        train_epoch(model, loader, optimizer, None, scaler, "cpu", cfg, origin)
        moved = {k for k, v in bn_stats(model).items() if not torch.equal(v, before[k])}
        aux = {k for k in before if ".aux." in k}
        assert moved == (aux if origin == "synthetic" else set(before) - aux)
    # a mixed run trains both sets, saves them, and scores with the real one
    run = train(
        quick(small_d7p, tmp_path / "run", train="mixed", synthetic_dir=str(fake_generation), synthetic_bn=True)
    )
    loaded, loaded_cfg, _ = load_classifier(tmp_path / "run" / LAST)
    assert loaded_cfg.synthetic_bn and not any(m.use_aux for m in loaded.modules() if isinstance(m, DualBatchNorm2d))
    result = evaluate(EvalConfig(checkpoint=str(tmp_path / "run" / LAST), data_dir=str(small_d7p), num_workers=0))
    assert result["overall"]["balanced_accuracy"] == pytest.approx(
        run["runs"][0]["history"][-1]["balanced_accuracy"], abs=1e-6
    )
    assert_timm_loads_the_classifier(tmp_path / "run")  # the twins stay home: timm gets a plain ResNet18


def test_mixed_runs_add_their_own_set_and_synthetic_only_keeps_the_text_set(
    tmp_path, small_d7p, fake_generation, variants
):
    out = tmp_path / "cmp"
    settings = dict(data_dir=str(small_d7p), image_size=32, epochs=1, batch_size=64, pretrained=False, num_workers=0)
    result = compare(
        CompareConfig(
            **settings, synthetic_dir=str(fake_generation), mixed_dir=str(variants), output_dir=str(out), seeds=[3]
        )
    )
    n_real, n_text = len(read_image_table(small_d7p, "train")), len(read_image_table(fake_generation))
    counts = {r["train"]: (r["n_real"], r["n_synthetic"]) for r in result["runs"]}
    assert counts == {"real": (n_real, 0), "synthetic": (0, n_text), "mixed": (n_real, 2 * n_real)}
    assert result["mixed_dir"] == str(variants)
    assert (
        f"Real + synthetic recipe: the synthetic images added to the real ones, from {variants}."
        in (out / "compare.md").read_text()
    )
    # the mixed run alone needs no text-to-image set; a set no run reads is refused
    CompareConfig(**settings, runs=["real", "mixed"], mixed_dir=str(variants))
    with pytest.raises(InputError, match="--mixed_dir: only the mixed runs use it"):
        CompareConfig(**settings, runs=["real", "synthetic"], synthetic_dir="s", mixed_dir=str(variants))
    with pytest.raises(InputError, match="--synthetic_dir: synthetic and mixed runs need synthetic images"):
        CompareConfig(**settings, runs=["real", "synthetic", "mixed"], mixed_dir=str(variants))


def test_the_steps_yardstick_gives_real_only_the_optimiser_steps_of_the_mix(tmp_path, small_d7p, variants):
    out = tmp_path / "cmp"
    settings = dict(data_dir=str(small_d7p), image_size=32, epochs=1, batch_size=16, pretrained=False, num_workers=0)
    result = compare(
        CompareConfig(
            **settings,
            mixed_dir=str(variants),
            runs=["real", "mixed"],  # real first, as a user lists them: the mixed run must still train first
            finetune_epochs=1,
            real_schedule="steps",
            output_dir=str(out),
        )
    )
    runs = {r["train"]: r for r in result["runs"]}
    n_real = len(read_image_table(small_d7p, "train"))
    # the mix: one epoch over the real images and their 2 variants each, then one over the real images alone
    assert runs["mixed"]["steps"] == 3 * n_real // 16 + n_real // 16
    history = json.loads((out / "real-seed0" / "summary.json").read_text())["history"]
    assert len(history) == runs["real"]["epochs"] == -(-runs["mixed"]["steps"] // (n_real // 16))
    assert runs["mixed"]["steps"] <= runs["real"]["steps"] < runs["mixed"]["steps"] + n_real // 16
    assert [r["train"] for r in result["runs"]] == ["real", "mixed"] and result["real_schedule"] == "steps"
    assert (
        f"(--real_schedule steps): seed 0: {runs['real']['epochs']} epochs, {runs['real']['steps']} steps against "
        f"{runs['mixed']['steps']}." in (out / "compare.md").read_text()
    )
    # the epochs yardstick, the default, gives real only both stages' epochs
    assert (
        CompareConfig(**settings, mixed_dir=str(variants), runs=["real", "mixed"], finetune_epochs=1)
        .run_config("real", 0)
        .epochs
        == 2
    )
    with pytest.raises(InputError, match="--real_schedule steps: counts the mixed run's steps"):
        CompareConfig(**settings, runs=["real", "synthetic"], synthetic_dir="s", real_schedule="steps")
    with pytest.raises(InputError, match="--real_schedule steps: each fold's runs"):
        CompareConfig(**settings, runs=["real", "mixed"], mixed_dir="m", real_schedule="steps", folds=2)


@pytest.mark.parametrize("n", [5, 16, 17, 40])
def test_the_step_count_is_the_loaders(tmp_path, small_d7p, n):
    frame = read_image_table(small_d7p, "train").head(n).assign(origin="real")
    loader = make_train_loader(quick(small_d7p, tmp_path, batch_size=16), frame, 0)
    assert steps_per_epoch(min(n, len(frame)), 16) == len(loader)


def test_matched_epochs_cover_the_mixed_steps_and_refuse_a_run_that_never_counted_them(tmp_path):
    mixed = {"steps": 340, "n_real": 187, "checkpoint": str(tmp_path / "mixed-seed0" / "best.safetensors")}
    assert matched_epochs(mixed, 32) == 68  # 5 steps an epoch over 187 real images (the demo's)
    assert matched_epochs({**mixed, "steps": 341}, 32) == 69  # at least the mix's steps, never fewer
    with pytest.raises(InputError, match=r"mixed-seed0 was trained by an earlier version that did not count its steps"):
        matched_epochs({**mixed, "steps": None}, 32)


def test_recipe_flag_errors(small_d7p):
    base = dict(data_dir=str(small_d7p), synthetic_dir="s")
    cases = [
        (dict(train="mixed", synthetic_ratio=1.0, synthetic_share=0.3), "--synthetic_ratio and --synthetic_share"),
        (dict(train="mixed", synthetic_share=1.5), "--synthetic_share: must lie between 0 and 1"),
        (
            dict(train="mixed", synthetic_share=0.005, share_per="batch"),
            "--batch_size 64 is 0 synthetic images a batch",
        ),
        (dict(train="synthetic", swap_probability=0.3), "--swap_probability: mixes synthetic and real images"),
        (dict(train="real", finetune_epochs=2), "--finetune_epochs: acts on synthetic images"),
        (dict(train="mixed", model="vit", synthetic_bn=True), "LayerNorm .* keeps no running statistics"),
        (dict(train="synthetic", synthetic_bn=True), "the real BatchNorm statistics used at evaluation never train"),
        (dict(train="mixed", synthetic_weight=-1.0), "--synthetic_weight: must be 0 or more"),
        (dict(train="real", tone_augment=1.5), r"--tone_augment: must lie in \[0, 1\], got 1.5"),
    ]
    for kw, message in cases:
        with pytest.raises(InputError, match=message):
            ClassifyConfig(**{**base, **kw})


def test_tone_augment_recolours_the_skin_to_every_band_and_keeps_the_lesion(small_d7p):
    """--tone_augment on real Derm7pt images: the lesion's pixels stay, the skin around it reads the drawn band's
    ITA, every band is drawn, and at probability 0 nothing changes and no random number is drawn."""
    frame = read_image_table(small_d7p, "train").head(4).assign(origin="real")
    size = 64
    masks = lesion_masks(frame["path"].tolist(), size)
    assert len(masks) >= 3  # the analyzer finds most lesions at the training size
    path = next(p for p in frame["path"] if p in masks)
    i, mask = frame["path"].tolist().index(path), masks[path]
    source = np.asarray(open_rgb(path, draft=size))
    assert mask.shape == source.shape[:2]
    as_array = v2.Compose([v2.ToImage()])
    tones = TrainingImages(frame, size, as_array, 1.0, masks)
    torch.manual_seed(0)
    itas = set()
    for _ in range(40):
        image = tones[i][0].permute(1, 2, 0).numpy()
        assert (image[mask] == source[mask]).all()  # the lesion untouched
        itas.add(labels.skin_tone_from_ita(surrounding_ita(image, mask)))
    assert itas == set(labels.SKIN_TONE_NAMES)  # each band drawn, and the skin reads as that band
    plain = TrainingImages(frame, size, as_array, 0.0, masks)
    state = torch.get_rng_state()
    assert (plain[i][0].permute(1, 2, 0).numpy() == source).all()
    assert torch.equal(torch.get_rng_state(), state)  # runs without it draw exactly as before it existed


def test_tone_augment_trains_and_resumes_only_with_its_own_setting(tmp_path, small_d7p):
    """A tone-augmented run trains; resuming it without the setting is refused, and a checkpoint from before the
    setting existed resumes as a run without it."""
    out = tmp_path / "tones"
    train(quick(small_d7p, out, tone_augment=0.5))
    with pytest.raises(InputError, match="--tone_augment: 0.0 differs from 0.5"):
        train(quick(small_d7p, out, epochs=2, resume_from_checkpoint="latest"))
    plain = tmp_path / "plain"
    train(quick(small_d7p, plain))
    state = read_state(plain / LAST, "")
    del state["config"]["tone_augment"]  # as written before --tone_augment existed
    write_state(plain / LAST, state)
    report = train(quick(small_d7p, plain, epochs=2, resume_from_checkpoint="latest"))
    assert [h["epoch"] for h in report["runs"][0]["history"]] == [1, 2]
