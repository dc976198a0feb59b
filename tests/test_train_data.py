"""Training data through datasets.load_dataset (--dataset_name: the project's parquet export, a local imagefolder)
and diffusers' plain imagefolder convention (file_name, text) for every model family, on the tiny models."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import small_config, write_manifest
from PIL import Image

from lesiongen.diffusion.dataset import StoredImage
from lesiongen.diffusion.export import ExportConfig, export
from lesiongen.diffusion.pipeline import load_training_parts
from lesiongen.diffusion.train import TrainConfig, main, train
from lesiongen.diffusion.train_data import load_examples
from lesiongen.errors import InputError


def quick_config(model: Path, out: Path, **overrides) -> TrainConfig:
    """Two LoRA steps of batch 2 (the data comes from ``overrides``)."""
    return small_config(
        model, TrainConfig.train_data_dir, out, **{"max_train_steps": 2, "checkpointing_steps": 100, **overrides}
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A generate.py-shaped folder of 4 random 64 px PNGs, with a metadata.jsonl (file_name, text, label) beside
    its manifest, and its parquet export in the sibling folder ``hf``."""
    rng = np.random.default_rng(0)
    rows = [{"label": code, "pixels": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)} for code in ("mel", "nv") * 2]
    folder = write_manifest(tmp_path_factory.mktemp("gen") / "gen", rows)
    frame = pd.read_csv(folder / "manifest.csv").sort_values("file_name")  # the export's row order
    lines = [json.dumps({"file_name": r.file_name, "text": r.text, "label": r.label}) for r in frame.itertuples()]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    export(ExportConfig(input_dir=str(folder), output_dir=str(folder.parent / "hf")))
    return folder


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory) -> Path:
    """diffusers' own imagefolder convention: images and a metadata.jsonl with only file_name and text."""
    folder = tmp_path_factory.mktemp("plain") / "plain"
    folder.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i, caption in enumerate(["melanoma, dermoscopic image", "nevus, dermoscopic image"] * 2):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_the_parquet_export_trains_exactly_as_its_image_folder(generated, tiny_sd_dir, tmp_path):
    """The export embeds the PNG bytes: a run reads them by row (no copies on disk), through the latent cache,
    and trains on the same pixels, captions and labels as the folder they came from."""
    hf = generated.parent / "hf"
    parts = load_training_parts(str(tiny_sd_dir))
    examples, field = load_examples(quick_config(tiny_sd_dir, tmp_path, dataset_name=str(hf)), parts)
    assert field == "text" and len(examples) == 4
    assert all(isinstance(ex.image, StoredImage) for ex in examples)
    rows = [json.loads(line) for line in (generated / "metadata.jsonl").read_text().splitlines()]
    assert [(ex.label, ex.text) for ex in examples] == [(r["label"], r["text"]) for r in rows]
    assert sorted(ex.label for ex in examples) == ["mel", "mel", "nv", "nv"]

    from_folder = train(quick_config(tiny_sd_dir, tmp_path / "folder", train_data_dir=str(generated)))
    from_parquet = train(quick_config(tiny_sd_dir, tmp_path / "parquet", dataset_name=str(hf)))
    assert len(from_parquet.losses) == 2 and from_parquet.losses == pytest.approx(from_folder.losses, abs=1e-6)
    assert list((tmp_path / "parquet" / "latent_cache").rglob("shard-*.safetensors"))
    record = json.loads((tmp_path / "parquet" / "config.json").read_text())
    assert record["caption_field"] == "text"
    assert record["config"]["dataset_name"] == os.path.relpath(hf, tmp_path / "parquet")


def test_a_local_imagefolder_through_load_dataset_keeps_its_files(plain_folder, tiny_sd_dir, tmp_path):
    parts = load_training_parts(str(tiny_sd_dir))
    examples, field = load_examples(quick_config(tiny_sd_dir, tmp_path, dataset_name=str(plain_folder)), parts)
    assert field == "text"
    assert [ex.image for ex in examples] == [plain_folder / f"{i}.png" for i in range(4)]
    assert examples[1].text == "nevus, dermoscopic image" and examples[0].label is None


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--image_column", "picture"], r"^error: --image_column picture: .* has no such column \(its columns: image, text\)"),
        (["--image_column", "text"], r"^error: --image_column text: is not an image column of .*\(columns: image, text\)"),
        (["--caption_column", "prompt"], r"^error: --caption_column prompt: .* has no such column \(its columns: image, text\)"),
    ],
)  # fmt: skip
def test_a_missing_column_is_one_line_naming_the_flag_and_the_columns(
    flags, match, plain_folder, tiny_sd_dir, tmp_path, capsys
):
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--dataset_name", str(plain_folder)]
    argv += ["--output_dir", str(tmp_path), "--report_to", "none", "--resolution", "64", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]  # beside the model's loading bars
    assert len(errors) == 1 and re.search(match, errors[0]) and "Traceback" not in err, err


def test_a_dataset_that_is_nowhere_is_one_line(tiny_sd_dir, tmp_path):
    parts = load_training_parts(str(tiny_sd_dir))
    with pytest.raises(InputError, match=r"--dataset_name nobody/no-such-set: is neither a local .* nor a reachable"):
        load_examples(quick_config(tiny_sd_dir, tmp_path, dataset_name="nobody/no-such-set"), parts)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"notes.txt: is a file, not a parquet file"):
        load_examples(quick_config(tiny_sd_dir, tmp_path, dataset_name=str(tmp_path / "notes.txt")), parts)


def test_every_family_trains_a_plain_imagefolder_with_no_extra_flag(
    family_name, tiny_family_dir, plain_folder, tmp_path, capsys
):
    """The T5 families default to long_text; on a folder with text only they say so in one line and train on text."""
    torch.manual_seed(0)
    out = tmp_path / family_name
    result = train(quick_config(tiny_family_dir, out, train_data_dir=str(plain_folder), max_train_steps=1))
    assert result.global_step == 1 and all(np.isfinite(result.losses))
    assert json.loads((out / "config.json").read_text())["caption_field"] == "text"
    notes = [line for line in capsys.readouterr().err.splitlines() if "so it trains on text" in line]
    assert len(notes) == (1 if family_name in ("sd3", "flux") else 0), notes
    if notes:
        assert notes[0].startswith(f"note: {family_name} trains on long_text by default")


def test_a_t5_family_trains_on_long_text_where_every_row_has_it(capsys):
    from lesiongen.diffusion.dataset import choose_caption_field
    from lesiongen.diffusion.families import FAMILIES

    assert choose_caption_field({"file_name", "text", "long_text"}, FAMILIES["sd3"], "x") == "long_text"
    assert choose_caption_field({"file_name", "text"}, FAMILIES["sd1"], "x") == "text"
    assert choose_caption_field({"file_name", "prompt"}, FAMILIES["flux"], "x") == "long_text"  # rows report it
    assert capsys.readouterr().err == ""
