"""The filter stage: a cross-fitted train-split filter marks unrecognised images and near-copies invalid, deleting
nothing, and a classifier trained on the filtered set sees only the kept images."""

from __future__ import annotations

import colorsys
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import write_manifest
from PIL import Image

from lesiongen import labels
from lesiongen.classify import train as classify
from lesiongen.evaluate.filter import main as filter_main
from lesiongen.tables import read_image_table

# Each class is one colour, so a tiny random-weight filter learns it in seconds and its verdicts are known.
COLOURS = {
    code: tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / len(labels.CODES), 0.8, 0.9))
    for i, code in enumerate(labels.CODES)
}
QUICK = ["--pretrained", "false", "--image_size", "32", "--epochs", "20", "--batch_size", "8", "--num_workers", "0"]
QUICK += ["--device", "cpu", "--folds", "2"]


def colour_image(label: str, rng: np.random.Generator) -> np.ndarray:
    noise = rng.integers(-25, 26, size=(32, 32, 3))
    return np.clip(np.array(COLOURS[label]) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def colour_captions(tmp_path_factory, small_d7p: Path) -> Path:
    """small_d7p's rows (labels, lesions, splits) over images that are their class's colour plus noise."""
    out = tmp_path_factory.mktemp("filter") / "captions"
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (small_d7p / split / "metadata.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["label"] in COLOURS]
        for row in rows:
            row["file_name"] = str(Path(row["file_name"]).with_suffix(".png"))
            (out / split / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colour_image(row["label"], rng)).save(out / split / row["file_name"])
        (out / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory, colour_captions: Path) -> tuple[Path, str, str, str]:
    """Two good images per class, a validation image asked as another class, a byte copy of a train image, and the
    same copy made a variant of that image."""
    rng = np.random.default_rng(1)
    val = read_image_table(colour_captions, "validation")
    train = read_image_table(colour_captions, "train")
    present = sorted(set(train["label"]))
    rows = [{"label": c, "pixels": colour_image(c, rng)} for c in present for _ in range(2)]
    shown = val.iloc[0]
    asked = next(c for c in present if c != shown["label"])
    rows.append({"label": asked, "pixels": np.asarray(Image.open(shown["path"]).convert("RGB"))})
    copied = train.iloc[0]
    rows += [{"label": copied["label"]}, {"label": copied["label"]}]
    folder = write_manifest(tmp_path_factory.mktemp("filter-gen") / "gen", rows)
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    for name in manifest["file_name"].iloc[-2:]:
        shutil.copyfile(copied["path"], folder / name)
    # the last one is a variant of that training image (generate.py --mode augment), at no change at all
    manifest.loc[manifest.index[-1], ["source", "strength"]] = [copied["path"], "0.3"]
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder, *manifest["file_name"].iloc[-3:]


def test_the_filter_drops_unrecognised_images_and_copies_keeps_every_row_and_reruns_the_same(
    tmp_path, colour_captions, generated, monkeypatch, capsys
):
    folder, mislabelled, copy, variant = generated
    seen: list[pd.DataFrame] = []
    real_fit = classify.fit

    def recording_fit(cfg, train_frame, val_frame, out):
        seen.extend([train_frame, val_frame])
        return real_fit(cfg, train_frame, val_frame, out)

    monkeypatch.setattr(classify, "fit", recording_fit)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
    args = ["--synthetic", str(folder), "--data_dir", str(colour_captions), "--output_dir", str(tmp_path / "f")]
    assert filter_main([*args, *QUICK, "--min_probability", "0.3"]) == 0

    # the filter never read a validation image: every frame it trained or selected on is the train split's
    train_paths = set(read_image_table(colour_captions, "train")["path"])
    assert len(seen) == 4 and all(set(f["path"]) <= train_paths for f in seen)
    assert set(seen[1]["path"]) | set(seen[3]["path"]) == train_paths  # the held-out folds cover the train split

    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False).set_index("file_name")
    assert len(manifest) == 2 * len(set(read_image_table(colour_captions, "train")["label"])) + 3
    assert manifest.loc[mislabelled, "valid"] == "false"
    asked = manifest.loc[mislabelled, "label"]
    assert manifest.loc[mislabelled, "invalid_reason"].startswith(f"filter: p({asked})=")
    assert manifest.loc[mislabelled, "invalid_reason"].endswith("< 0.30")
    assert manifest.loc[copy, "valid"] == "false"
    assert manifest.loc[copy, "invalid_reason"].startswith("near-copy of ")
    assert manifest.loc[copy, "invalid_reason"].endswith(
        Path(read_image_table(colour_captions, "train")["path"][0]).name
    )
    assert manifest.loc[variant, "valid"] == "true"  # compared with every training image but its own source
    kept = manifest.index[manifest["valid"] == "true"]
    assert len(kept) == len(manifest) - 2
    assert sorted(p.relative_to(folder) for p in folder.rglob("*.png")) == files  # nothing deleted or moved
    listed = [json.loads(line)["file_name"] for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert sorted(listed) == sorted(kept)
    summary = json.loads((tmp_path / "f" / "filter.json").read_text())
    assert (summary["kept"], summary["dropped"], summary["per_reason"]) == (len(kept), 2, {"filter": 1, "near-copy": 1})
    assert summary["per_class"][asked]["dropped"] >= 1

    before = (folder / "manifest.csv").read_text()
    assert filter_main([*args, *QUICK, "--min_probability", "0.3"]) == 0  # the fold models resume, finished
    assert (folder / "manifest.csv").read_text() == before
    capsys.readouterr()
    assert filter_main([*args, *QUICK, "--seed", "1"]) == 2  # fold models of other folds are not reused
    assert "holds filter models of other folds" in capsys.readouterr().err
    assert (folder / "manifest.csv").read_text() == before

    # a classifier trained on the filtered set trains on the kept images only
    monkeypatch.setattr(classify, "fit", real_fit)
    out = tmp_path / "cls"
    flags = ["--data_dir", str(colour_captions), "--synthetic_dir", str(folder), "--train", "synthetic"]
    assert classify.main([*flags, "--output_dir", str(out), *QUICK[:-2], "--epochs", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["n_train"] == {"synthetic": len(kept)}


def test_the_filter_refuses_a_folder_without_a_manifest_or_a_train_split(tmp_path, colour_captions, generated, capsys):
    folder = generated[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--output_dir", str(tmp_path / "f"), *QUICK]
    assert filter_main(["--synthetic", str(empty), "--data_dir", str(colour_captions), *out]) == 2
    assert "holds no manifest.csv" in capsys.readouterr().err
    assert filter_main(["--synthetic", str(folder), "--data_dir", str(empty), *out]) == 2
    assert f"--data_dir {empty}: has no train/metadata.jsonl" in capsys.readouterr().err
    assert filter_main(["--synthetic", str(folder), "--data_dir", str(colour_captions), *out, "--folds", "1"]) == 2
    assert "--folds" in capsys.readouterr().err
