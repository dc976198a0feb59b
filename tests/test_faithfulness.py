"""Faithfulness on known answers: unseen real-like images are recognised like held-out reals, a generator that
ignores its prompt scores near chance, and a pair differing only in a painted blue-gray area shows a veil effect."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from lesiongen import labels
from lesiongen.captions.build import BuildCaptionsConfig, build
from lesiongen.classify.config import ClassifyConfig
from lesiongen.classify.train import train
from lesiongen.demo.data import DemoDataConfig, make_demo_data
from lesiongen.evaluate import faithfulness
from lesiongen.evaluate.run import main as evaluate_main

VEIL_RGB = (140, 168, 209)  # the demo data's blue-whitish veil colour (0.55, 0.66, 0.82)
CONTRAST = "blue_whitish_veil=present:absent"


# ---- pure functions ----------------------------------------------------------------------------------


def test_recognisability_of_hand_made_probabilities():
    asked = ["mel", "mel", "nv", "nv", "bcc", "bcc"]
    pred = ["mel", "nv", "nv", "nv", "mel", "bcc"]
    proba = np.zeros((6, len(labels.CODES)))
    proba[np.arange(6), [labels.CODES.index(p) for p in pred]] = 1.0
    r = faithfulness.recognisability(asked, proba, real_balanced_accuracy=0.8)
    assert r["recall"] == {"bcc": 0.5, "mel": 0.5, "nv": 1.0}
    assert r["balanced_accuracy"] == pytest.approx(2 / 3) and r["ratio"] == pytest.approx((2 / 3) / 0.8)
    assert r["chance"] == pytest.approx(1 / 3) and r["min_recall"] == 0.5 and r["predicted"]["nv"] == 3


def test_bootstrap_interval_covers_the_mean_and_detects_a_shift():
    rng = np.random.default_rng(0)
    shifted = faithfulness.bootstrap_mean(rng.normal(1.0, 1.0, 200))
    assert shifted["low"] < shifted["mean"] < shifted["high"] and shifted["excludes_zero"]
    null = faithfulness.bootstrap_mean(rng.normal(0.0, 1.0, 200))
    assert null["low"] < 0 < null["high"] and not null["excludes_zero"]
    assert faithfulness.bootstrap_mean([1.0])["low"] is None


def test_ita_band_error_is_zero_inside_the_band_and_degrees_outside():
    assert faithfulness.ita_band_error(30.0, "intermediate") == 0.0  # 28 < 30 <= 41
    assert faithfulness.ita_band_error(20.0, "intermediate") == pytest.approx(8.0)
    assert faithfulness.ita_band_error(50.0, "intermediate") == pytest.approx(9.0)
    assert faithfulness.ita_band_error(None, "light") is None


def test_pairs_table_links_complete_pairs_only():
    frame = pd.DataFrame(
        {
            "pair": ["a", "a", "b", "c", "c"],
            "contrast": [CONTRAST] * 3 + ["skin_tone=very light:brown"] * 2,
            "blue_whitish_veil": ["present", "absent", "present", "absent", "absent"],
            "skin_tone": ["light", "light", "light", "very light", "brown"],
        }
    )
    table = faithfulness.pairs(frame)
    assert table[["pair", "field", "on", "off"]].values.tolist() == [
        ["a", "blue_whitish_veil", 0, 1],
        ["c", "skin_tone", 3, 4],
    ]
    effects = faithfulness.paired_effects(table, pd.Series([5.0, 1.0, 0.0, 40.0, -10.0]))
    assert effects[CONTRAST]["mean"] == 4.0 and effects["skin_tone=very light:brown"]["mean"] == 50.0


def test_a_file_listed_under_two_prompts_is_found():
    frame = pd.DataFrame({"path": ["x_absent.png", "y.png", "x_absent.png"], "text": ["no veil", "veil", "no streaks"]})
    assert faithfulness.shared_files(frame) == ["x_absent.png"]
    assert faithfulness.shared_files(frame.iloc[:2]) == []


# ---- the evaluate stage on known answers -------------------------------------------------------------


def write_manifest(root: Path, images: list[tuple[Path, str]], extra: list[dict] | None = None) -> Path:
    """A generate.py-shaped folder: the given images copied under dataset/<Condition>/ with their asked labels."""
    rows = []
    for i, (src, dx) in enumerate(images):
        name = f"dataset/{labels.BY_CODE[dx].name}/{dx}_{i:06d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).save(root / name)
        rows.append({"file_name": name, "label": dx, "dx": dx, "skin_tone": "unknown", **(extra[i] if extra else {})})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def painted_veil(src: Path, dst: Path) -> None:
    """The image with a blue-gray disc painted over the lesion centre, as the demo data draws a veil."""
    im = Image.open(src).convert("RGB")
    s = im.size[0]
    ImageDraw.Draw(im).ellipse([s * 0.36, s * 0.36, s * 0.64, s * 0.64], fill=VEIL_RGB)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst)


@pytest.fixture(scope="module")
def known(tmp_path_factory, tiny_sd_dir):
    """Built-in lesion images: a real classifier trained on one draw, judged on a second, unseen draw."""
    root = tmp_path_factory.mktemp("faithful")
    make_demo_data(DemoDataConfig(output_dir=str(root / "data"), images_per_class=24, resolution=32, seed=5))
    captions = root / "captions"
    build(
        BuildCaptionsConfig(
            dataset="ham10000",
            metadata=str(root / "data" / "metadata.csv"),
            images=str(root / "data" / "images"),
            output_dir=str(captions),
            split_fractions=[0.5, 0.1, 0.4],
            reporter="metadata",
        )
    )
    cls = root / "cls"
    train(
        ClassifyConfig(
            data_dir=str(captions),
            image_size=32,
            epochs=10,
            lr=2e-3,
            batch_size=32,
            num_workers=0,
            output_dir=str(cls),
            resume_from_checkpoint=None,
            pretrained=False,
        )
    )
    make_demo_data(DemoDataConfig(output_dir=str(root / "unseen"), images_per_class=12, resolution=32, seed=6))
    meta = pd.read_csv(root / "unseen" / "metadata.csv")
    unseen = [(root / "unseen" / "images" / f"{r.image_id}.png", r.dx) for r in meta.itertuples()]
    faithful = write_manifest(root / "faithful", unseen)
    rng = random.Random(0)
    ignoring = write_manifest(root / "ignoring", [(p, rng.choice(labels.CODES)) for p, _ in unseen])
    pair_images, extra = [], []
    for i, (p, dx) in enumerate(unseen[::4]):
        painted_veil(p, root / "painted" / f"{i}.png")
        pair_images += [(root / "painted" / f"{i}.png", dx), (p, dx)]
        extra += [{"pair": f"p{i}", "contrast": CONTRAST, "blue_whitish_veil": v} for v in ("present", "absent")]
    pairs = write_manifest(root / "pairs", pair_images, extra)

    def evaluate(synthetic: Path, name: str, *more: str) -> dict:
        argv = ["--real", str(captions), "--synthetic", str(synthetic), "--output_dir", str(root / name)]
        argv += ["--features", "domain", "--classifier", str(cls), "--concepts", "blue_whitish_veil", *more]
        assert evaluate_main(argv) == 0
        return json.loads((root / name / "evaluation.json").read_text())

    return {
        "faithful": evaluate(faithful, "eval_faithful", "--pairs", str(pairs)),
        "ignoring": evaluate(ignoring, "eval_ignoring", "--attributes", "false", "--vae", str(tiny_sd_dir)),
        "root": root,
    }


def test_unseen_real_like_images_are_as_recognisable_as_held_out_reals(known):
    rec = known["faithful"]["recognisability"]
    assert rec["real_balanced_accuracy"] > 2 * rec["chance"]  # the judge itself has learnt the conditions
    assert 0.75 < rec["ratio"] < 1.3 and rec["n"] == rec["overall"]["n"]
    assert (known["root"] / "eval_faithful" / "recognisability_confusion.png").is_file()
    table = pd.read_csv(known["root"] / "eval_faithful" / "recognisability.csv")
    assert len(table) == rec["n"] and set(table["predicted"]) <= set(labels.CODES)


def test_a_generator_that_ignores_its_prompt_scores_near_chance(known):
    rec = known["ignoring"]["recognisability"]
    assert rec["balanced_accuracy"] < 1.8 * rec["chance"] and rec["ratio"] < 0.5
    assert known["faithful"]["recognisability"]["balanced_accuracy"] > 2 * rec["balanced_accuracy"]


def test_an_autoencoder_that_reconstructs_nothing_caps_recognisability_near_chance(known):
    """tiny_sd_dir's VAE has random weights: its reconstructions of the held-out reals carry no condition."""
    rec = known["ignoring"]["recognisability"]
    ceiling = rec["vae_ceiling"]
    assert (
        ceiling["n"]
        == rec["n_heldout_real"]
        == len(list((known["root"] / "eval_ignoring" / "vae_reconstructions").glob("*.png")))
    )
    assert ceiling["balanced_accuracy"] < 1.8 * rec["chance"] and ceiling["ratio"] < 0.5
    assert "VAE ceiling" in (known["root"] / "eval_ignoring" / "evaluation.md").read_text()
    assert "vae_ceiling" not in known["faithful"]["recognisability"]


def test_a_painted_blue_gray_area_shows_a_positive_veil_effect(known):
    result = known["faithful"]
    effect = result["paired_descriptors"][CONTRAST]
    assert effect["descriptor"] == "blue_gray_pct" and effect["mean"] > 1.0 and effect["excludes_zero"]
    assert result["pairs"]["per_contrast"] == {CONTRAST: effect["n"]}
    probe = result["spaces"]["domain"]["paired_probe"][CONTRAST]
    assert probe["n"] == effect["n"] and np.isfinite(probe["mean"])
    md = (known["root"] / "eval_faithful" / "evaluation.md").read_text()
    assert "## Recognisability" in md and "## Paired steering" in md and f"| {CONTRAST} |" in md


def test_pairs_that_share_a_file_across_switches_are_refused(known, tmp_path, capsys):
    """What --contrast wrote before its file names carried the switch: two 'absent' images, one file."""
    root = known["root"]
    rows = pd.read_csv(root / "pairs" / "manifest.csv")
    rows["text"] = [f"prompt {i}" for i in range(len(rows))]
    rows.loc[3, "file_name"] = rows.loc[1, "file_name"]
    rows.to_csv(root / "pairs" / "shared.csv", index=False)
    argv = ["--real", str(root / "captions"), "--synthetic", str(root / "faithful" / "manifest.csv")]
    argv += ["--output_dir", str(tmp_path / "eval"), "--pairs", str(root / "pairs" / "shared.csv")]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert "shared.csv" in err and "named by two different rows" in err and "regenerate the set" in err
    assert not (tmp_path / "eval" / "evaluation.json").exists()
