import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lesiongen.captions.build import BuildCaptionsConfig, build
from lesiongen.captions.metadata import LesionRecord
from lesiongen.captions.text import caption
from lesiongen.errors import InputError
from lesiongen.files import read_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ham_built(tmp_path_factory, ham_csv):
    out = tmp_path_factory.mktemp("ham_captions")
    summary = build(BuildCaptionsConfig(dataset="ham10000", metadata=str(ham_csv), output_dir=str(out), seed=7))
    return out, summary


@pytest.fixture(scope="session")
def d7p_built(tmp_path_factory, d7p_csv, d7p_images):
    out = tmp_path_factory.mktemp("d7p_captions")
    cfg = BuildCaptionsConfig(
        dataset="d7p",
        metadata=str(d7p_csv),
        images=str(d7p_images),
        output_dir=str(out),
        skip_bad_rows=True,
        reporter="metadata",
    )
    return out, build(cfg)


def test_every_ham_row_gets_a_caption_within_clip_window(ham_built, ham_csv):
    out, summary = ham_built
    rows = read_jsonl(out / "captions.jsonl")
    assert len(rows) == 10015 == summary["captioned"]
    assert summary["images_checked"] is False
    assert {r["image_id"] for r in rows} == set(pd.read_csv(ham_csv)["image_id"])
    assert max(r["n_tokens"] for r in rows) <= 77
    assert all(r["diagnosis"] in r["text"] for r in rows)
    assert all(r["concept_source"] == "imputed" for r in rows)
    assert summary["tokens"]["max"] <= 77 and sum(summary["tokens"]["histogram"].values()) == 10015


def test_ham_splits_group_lesions_and_keep_proportions(ham_built):
    out, _ = ham_built
    df = pd.DataFrame(read_jsonl(out / "captions.jsonl"))
    assert df.groupby("lesion_id")["split"].nunique().max() == 1
    whole = df.label.value_counts(normalize=True)
    for split in ("train", "validation", "test"):
        part = df[df.split == split].label.value_counts(normalize=True)
        assert (part - whole).abs().max() < 0.03


def test_read_back_record_recaptions_to_stored_text(ham_built):
    out, _ = ham_built
    for row in read_jsonl(out / "captions.jsonl")[:300]:
        rec = LesionRecord.from_row(row)
        assert caption(rec, row["caption_style"], row["caption_seed"]).text == row["text"]


def test_d7p_rows_with_images_are_captioned_rest_counted(d7p_built):
    out, summary = d7p_built
    assert summary["captioned"] == 616 and summary["skipped"]["missing_images"] == 395
    train = read_jsonl(out / "train" / "metadata.jsonl")
    valid = read_jsonl(out / "validation" / "metadata.jsonl")
    assert (len(train), len(valid)) == (413, 203)
    assert not (out / "test" / "metadata.jsonl").exists()
    assert all((out / "train" / r["file_name"]).is_file() for r in train)
    assert all(r["concept_source"] == "expert" and r["n_tokens"] <= 77 for r in train)


def test_d7p_loads_with_datasets_imagefolder(d7p_built):
    datasets = pytest.importorskip("datasets")
    out, _ = d7p_built
    ds = datasets.load_dataset("imagefolder", data_dir=str(out))
    assert ds["train"].num_rows == 413 and ds["validation"].num_rows == 203
    item = ds["validation"][0]
    assert (
        item["image"].size[0] > 0
        and "dermoscop" in item["text"]
        and item["label"] in ("mel", "nv", "bcc", "bkl", "df", "vasc", "other")
    )


def test_missing_image_is_an_error_without_skip(tmp_path, d7p_csv, d7p_images):
    cfg = BuildCaptionsConfig(dataset="d7p", metadata=str(d7p_csv), images=str(d7p_images), output_dir=str(tmp_path))
    with pytest.raises(InputError, match="missing image for image_id .*--skip_bad_rows"):
        build(cfg)


def test_corrupt_image_is_reported(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "I1.jpg").write_bytes(b"not a jpeg")
    csv = tmp_path / "m.csv"
    csv.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\nL1,I1,mel,histo,50,male,back\n")
    cfg = BuildCaptionsConfig(
        dataset="ham10000",
        metadata=str(csv),
        images=str(images),
        output_dir=str(tmp_path / "o"),
        split_fractions=[1.0, 0.0, 0.0],
    )
    with pytest.raises(InputError, match="I1.jpg: unreadable image .*replace the image or pass --skip_bad_rows"):
        build(cfg)


HAM_HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"


def ham_rows(tmp_path, ids: list[str]) -> Path:
    csv = tmp_path / f"{'-'.join(ids)}.csv"
    csv.write_text(HAM_HEADER + "".join(f"L{i},{i},mel,histo,50,male,back\n" for i in ids))
    return csv


def one_split(csv: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "ham10000", "--metadata", str(csv), "--images", str(images), "--out", str(out)] + [
        "--split_fractions", "1", "0", "0", *extra
    ]  # fmt: skip


def test_oversized_image_is_skipped_or_one_line(tmp_path, d7p_images, capsys):
    from builders import oversized_png

    from lesiongen.captions.build import main

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next(d7p_images.rglob("*.jpg")), images / "I1.jpg")
    oversized_png(images / "I2.png")
    csv = ham_rows(tmp_path, ["I1", "I2"])
    assert main(one_split(csv, images, tmp_path / "strict")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "I2.png: unreadable image" in err and "exceeds the limit" in err
    assert main(one_split(csv, images, tmp_path / "skip", "--skip_bad_rows")) == 0
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["captioned"] == 1 and summary["skipped"]["corrupt_images"] == 1


def test_no_link_is_placed_before_every_row_is_checked(tmp_path, d7p_images):
    from builders import truncated_jpeg

    images = tmp_path / "images"
    images.mkdir()
    first = next(d7p_images.rglob("*.jpg"))
    shutil.copy(first, images / "I1.jpg")
    truncated_jpeg(first, images / "I2.jpg")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="I2.jpg: unreadable image"):
        build(BuildCaptionsConfig(**cli_config(one_split(ham_rows(tmp_path, ["I1", "I2"]), images, out))))
    assert not out.exists() or not [p for p in out.rglob("*") if not p.is_dir()]


def test_rebuild_removes_what_it_no_longer_lists(tmp_path, d7p_images):
    images = tmp_path / "images"
    images.mkdir()
    for i, src in zip(("I1", "I2"), sorted(d7p_images.rglob("*.jpg")), strict=False):
        shutil.copy(src, images / f"{i}.jpg")
    out = tmp_path / "out"
    build(BuildCaptionsConfig(**cli_config(one_split(ham_rows(tmp_path, ["I1", "I2"]), images, out))))
    assert sorted(p.name for p in (out / "train" / "images").iterdir()) == ["I1.jpg", "I2.jpg"]
    summary = build(BuildCaptionsConfig(**cli_config(one_split(ham_rows(tmp_path, ["I1"]), images, out))))
    assert [p.name for p in (out / "train" / "images").iterdir()] == ["I1.jpg"]
    assert [r["image_id"] for r in read_jsonl(out / "train" / "metadata.jsonl")] == ["I1"]
    assert summary["stale_images_removed"] == 1
    # captions alone list no image: no split may keep the earlier build's rows
    csv = ham_rows(tmp_path, ["I1"])
    build(BuildCaptionsConfig(dataset="ham10000", metadata=str(csv), output_dir=str(out), split_fractions=[1, 0, 0]))
    assert not (out / "train" / "metadata.jsonl").exists() and not list((out / "train" / "images").iterdir())


def test_a_first_build_removes_nothing_already_in_the_output_folder(tmp_path, d7p_images):
    """Only a folder an earlier build wrote is tidied: --out may name a folder that holds other files."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next(d7p_images.rglob("*.jpg")), images / "I1.jpg")
    out = tmp_path / "shared"
    (out / "train" / "images").mkdir(parents=True)
    (out / "train" / "images" / "mine.jpg").write_bytes(b"someone else's")
    build(BuildCaptionsConfig(**cli_config(one_split(ham_rows(tmp_path, ["I1"]), images, out))))
    assert (out / "train" / "images" / "mine.jpg").read_bytes() == b"someone else's"


def test_a_built_folder_moved_with_its_images_still_loads(tmp_path, d7p_images):
    """Symlinks are relative, so copying or moving the captions folder together with the images keeps it whole."""
    datasets = pytest.importorskip("datasets")
    project = tmp_path / "project"
    images = project / "images"
    images.mkdir(parents=True)
    for i, src in zip(("I1", "I2"), sorted(d7p_images.rglob("*.jpg")), strict=False):
        shutil.copy(src, images / f"{i}.jpg")
    out = project / "captions"
    build(BuildCaptionsConfig(**cli_config(one_split(ham_rows(tmp_path, ["I1", "I2"]), images, out))))
    link = out / "train" / "images" / "I1.jpg"
    assert link.is_symlink() and Path(os.readlink(link)) == Path("..", "..", "..", "images", "I1.jpg")
    moved = shutil.move(project, tmp_path / "elsewhere" / "project")
    ds = datasets.load_dataset("imagefolder", data_dir=str(Path(moved) / "captions"), split="train")
    assert ds.num_rows == 2 and all(image.size[0] > 0 for image in ds["image"])


def cli_config(args: list[str]) -> dict:
    """build_captions.py arguments as BuildCaptionsConfig fields."""
    from lesiongen.cli import build_parser

    return vars(build_parser(BuildCaptionsConfig).parse_args(args))


def test_skipped_rows_at_the_end_do_not_break_the_official_split(tmp_path, d7p_csv):
    """Derm7pt's index files number meta.csv's rows; skipping its last rows must not make them 'outside'."""
    meta = tmp_path / "meta"
    meta.mkdir()
    for name in ("train_indexes.csv", "valid_indexes.csv", "test_indexes.csv"):
        shutil.copy(d7p_csv.parent / name, meta / name)
    df = pd.read_csv(d7p_csv, dtype=str, keep_default_na=False)
    df.loc[len(df) - 2 :, "diagnosis"] = "not a diagnosis"
    df.to_csv(meta / "meta.csv", index=False)
    cfg = BuildCaptionsConfig(
        dataset="d7p", metadata=str(meta / "meta.csv"), output_dir=str(tmp_path / "out"), skip_bad_rows=True
    )
    summary = build(cfg)
    assert summary["skipped"]["bad_rows"] == 2 and summary["split_method"].startswith("official")
    assert sum(sum(v.values()) for v in summary["per_split"].values()) == len(df) - 2


def test_label_style(tmp_path, ham_csv):
    small = tmp_path / "small.csv"
    pd.read_csv(ham_csv).head(200).to_csv(small, index=False)
    build(BuildCaptionsConfig(dataset="ham10000", metadata=str(small), output_dir=str(tmp_path / "o"), style="label"))
    rows = read_jsonl(tmp_path / "o" / "captions.jsonl")
    assert {r["text"] for r in rows} <= {f"a dermoscopic image of {r['diagnosis']}" for r in rows}
    assert all(r["concept_source"] == "none" for r in rows)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "build_captions.py", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("--dataset", "ham10000", "--metadata", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.csv: metadata file not found" in proc.stderr
    proc = run_cli("--dataset", "isic", "--metadata", "x", "--out", "y")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_cli_end_to_end_summary(tmp_path, ham_csv):
    small = tmp_path / "small.csv"
    pd.read_csv(ham_csv).head(100).to_csv(small, index=False)
    proc = run_cli("--dataset", "ham10000", "--metadata", str(small), "--out", str(tmp_path / "o"), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "captioned 100 images" in proc.stdout and "no image was checked" in proc.stdout
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["config"]["seed"] == 3


def test_one_image_is_never_in_two_splits_under_ids_that_differ_in_case_or_as_a_copy(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        Image.new("RGB", (32, 32), (100 + 5 * i, 80, 60)).save(images / f"ISIC_{i:04d}.png")
    shutil.copy(images / "ISIC_0003.png", images / "ISIC_0099.png")  # the same bytes under another name
    rows = [f"L{i},ISIC_{i:04d},nv,histo,40,female,back" for i in range(20)]
    rows += ["L50,isic_0001,nv,histo,40,female,back", "L51,ISIC_0099,nv,histo,40,female,back"]
    csv = tmp_path / "meta.csv"
    csv.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    args = dict(dataset="ham10000", metadata=str(csv), images=str(images), output_dir=str(out), reporter="metadata")
    summary = build(BuildCaptionsConfig(**args, split_fractions=[0.5, 0.25, 0.25]))
    kept = read_jsonl(out / "captions.jsonl")
    assert summary["skipped"]["duplicate_images"] == 2 and len(kept) == 20
    assert sorted(summary["skipped_examples"]["duplicate_images"]) == [
        "ISIC_0099 (same image as ISIC_0003)",
        "isic_0001 (same image as ISIC_0001)",
    ]
    placed = [(out / r["split"] / r["file_name"]).resolve() for r in kept]
    assert len(set(placed)) == len(placed) == 20
    assert "2 duplicate images" in capsys.readouterr().out
