"""``python -m lesiongen.audit`` on known answers: a classifier that reads only the skin around the lesion flips
when the skin tone changes, one that reads only the lesion never does (its pixels are kept), and a model that
cannot draw the asked skin has its edits excluded, not scored.

The known-answer tests stand a perfect skin painter in for the sampler (the audit's logic, not the generator, is
under test there); the last test runs the real tiny model, whose random weights draw no skin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import color

import lesiongen.diffusion.generate as generate_module
from lesiongen import labels
from lesiongen.audit.run import AuditConfig, audit, main
from lesiongen.captions.build import main as build_captions
from lesiongen.errors import InputError
from lesiongen.images import read_rgb

SIDE = 64  # the tiny model's size: sources need no resize, so a kept lesion is the source's pixels exactly
# An ITA of about 48 degrees (light), and the Lab colour painted for each asked tone, well inside its band.
SOURCE_SKIN = (205, 160, 135)
TONE_LAB = {"very light": (82, 8, 12), "dark": (28, 12, 22)}


def lesion_image(i: int, malignant: bool) -> np.ndarray:
    """Light skin with a round lesion at the centre: melanomas dark brown, nevi a lighter brown."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    img = np.empty((SIDE, SIDE, 3), np.float32)
    img[:] = SOURCE_SKIN
    img += np.random.default_rng(i).normal(0, 3, img.shape)
    disk = (yy - 32) ** 2 + (xx - 32) ** 2 < (11 + i % 4) ** 2
    img[disk] = (70, 45, 35) if malignant else (150, 100, 70)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """A build_captions folder whose 12 images all land in its test split."""
    root = tmp_path_factory.mktemp("audit_data")
    (root / "images").mkdir()
    rows = []
    for i in range(12):
        malignant = i % 2 == 0
        Image.fromarray(lesion_image(i, malignant)).save(root / "images" / f"ISIC_{i:04d}.png")
        rows.append(f"L{i},ISIC_{i:04d},{'mel' if malignant else 'nv'},histo,50,female,back")
    (root / "meta.csv").write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n" + "\n".join(rows) + "\n")
    args = ["--dataset", "ham10000", "--metadata", str(root / "meta.csv"), "--images", str(root / "images")]
    args += ["--out", str(root / "captions"), "--split_fractions", "0", "0", "1", "--reporter", "metadata"]
    assert build_captions(args) == 0
    return root / "captions"


def painted_sampler(pipe, prompts, negatives, seeds, guidance, steps, cfg, lora, inputs=None):
    """A perfect editor: every pixel outside the kept lesion becomes the asked tone's skin (the prompt names it)."""
    out = []
    for prompt, given in zip(prompts, inputs, strict=True):
        tone = next(t for t in sorted(TONE_LAB, key=len, reverse=True) if f"{t} skin" in prompt)
        skin = color.lab2rgb(np.array([[TONE_LAB[tone]]], float))[0, 0]
        pixels = np.asarray(given.image, np.float32) / 255
        pixels[~given.keep] = skin
        out.append(pixels)
    return out


def border_brightness(path) -> float:
    img = read_rgb(path, size=SIDE).astype(float)
    return float(np.concatenate([img[:6].ravel(), img[-6:].ravel()]).mean())


def centre_darkness(path) -> float:
    return float(read_rgb(path, size=SIDE)[26:38, 26:38].astype(float).mean())


def fake_classifier(monkeypatch, reads):
    """``load_classifier``/``predict_proba`` standing in for a trained model that decides from one feature."""
    import lesiongen.classify.models as models

    codes = list(labels.CODES)

    def predict(model, frame, cfg, device, desc=""):
        proba = np.full((len(frame), len(codes)), 0.02)
        for row, path in enumerate(frame["path"]):
            proba[row, codes.index(reads(path))] = 0.9
        return proba

    monkeypatch.setattr(models, "load_classifier", lambda path, device="cpu": (None, None, {}))
    monkeypatch.setattr(models, "predict_proba", predict)


def config(captions: Path, model: Path, out: Path, **kw) -> AuditConfig:
    base = dict(
        classifier=str(out.parent / "classifier"),
        data_dir=str(captions),
        model=str(model),
        values=["very light", "dark"],
        output_dir=str(out),
        num_inference_steps=4,
        strength=0.5,
        device="cpu",
    )
    return AuditConfig(**{**base, **kw})


def test_a_classifier_that_reads_the_skin_flips_and_the_audit_says_so(captions, tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "sample", painted_sampler)
    fake_classifier(monkeypatch, lambda path: "mel" if border_brightness(path) < 120 else "nv")
    out = tmp_path / "skin"
    result = audit(config(captions, tiny_sd_dir, out))
    n, stats = result["counts"], result["statistics"]
    assert (n["sources"], n["counterfactuals"], n["valid"], n["excluded"]) == (12, 24, 24, 0)
    # every source reads as benign on its light skin; every dark edit reads as malignant
    assert stats["flip_rate"]["estimate"] == 0.5 and stats["flip_rate"]["low"] > 0
    assert stats["flip_benign_to_malignant"]["estimate"] == 0.5 and stats["flip_malignant_to_benign"] is None
    assert stats["tpr[dark]"]["estimate"] == 1.0 and stats["tpr[very light]"]["estimate"] == 0.0
    assert stats["eod"]["estimate"] == 1.0
    validity = result["validity"]
    assert validity["dark"]["skin_ita_valid_mean"] < -30 < 55 < validity["very light"]["skin_ita_valid_mean"]
    assert validity["dark"]["lesion_change_mean"] == 0.0  # the lesion is the source's, pixel for pixel

    table = pd.read_csv(out / "manifest.csv")
    assert len(table) == 24 and set(table["value"]) == {"very light", "dark"}
    for row in table.itertuples():
        assert (out / row.file_name).is_file() and not Path(row.file_name).is_absolute()
        assert Path(row.source).is_file()
    flips = table[table["pred"] != table["base_pred"]]
    assert set(flips["value"]) == {"dark"} and len(flips) == 12
    saved = json.loads((out / "audit.json").read_text())
    assert saved["statistics"]["flip_rate"]["estimate"] == 0.5
    page = (out / "audit.html").read_text()
    assert "data:image/png;base64," in page and "flips, benign to malignant" in page
    assert "no effect shown" not in page.split("flips, any")[1].split("</tr>")[0]
    grid = Image.open(out / "audit_grid.png")
    assert grid.width == 3 * SIDE  # source, very light, dark


def test_a_classifier_that_reads_the_lesion_never_flips(captions, tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "sample", painted_sampler)
    fake_classifier(monkeypatch, lambda path: "mel" if centre_darkness(path) < 80 else "nv")
    result = audit(config(captions, tiny_sd_dir, tmp_path / "lesion"))
    stats = result["statistics"]
    assert stats["flip_rate"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    assert stats["worst_value_accuracy"]["estimate"] == 1.0 and stats["eod"]["estimate"] == 0.0
    assert "flips, any | 0.000 [0.000, 0.000], no effect shown" in (tmp_path / "lesion" / "audit.md").read_text()


def test_a_model_that_cannot_draw_skin_has_its_edits_excluded_not_scored(captions, tiny_sd_dir, tmp_path, monkeypatch):
    fake_classifier(monkeypatch, lambda path: "mel" if border_brightness(path) < 120 else "nv")
    result = audit(config(captions, tiny_sd_dir, tmp_path / "random"))  # random weights: noise, not skin
    n = result["counts"]
    assert n["counterfactuals"] == 24 and n["valid"] == 0 and n["excluded"] == 24
    assert result["statistics"] == {}
    reasons = result["counts"]["excluded_reasons"]
    assert sum(reasons.values()) == 24 and all("noise, not skin" in r for r in reasons)
    table = pd.read_csv(tmp_path / "random" / "manifest.csv")
    assert (table["skin_spread_after"] > 25).all()  # each started from its tone guide, and came back as noise


def test_bad_audit_input_is_one_line(captions, tiny_sd_dir, tmp_path, capsys):
    base = ["--classifier", str(tmp_path / "c"), "--data_dir", str(captions), "--model", str(tiny_sd_dir)]
    base += ["--output_dir", str(tmp_path / "o")]
    cases = {
        "--values: ['purple'] are not skin tones": ["--values", "purple"],
        "--attribute: 'hair_colour' is not skin_tone or a concept": ["--attribute", "hair_colour", "--values", "x"],
        "--values: ['dark', 'dark'] repeats a value": ["--values", "dark", "dark"],
    }
    for message, extra in cases.items():
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(InputError, match="--counterfactuals_per_image"):
        config(captions, tiny_sd_dir, tmp_path / "o", counterfactuals_per_image=0)
