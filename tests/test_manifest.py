"""manifest.csv never holds one image twice: reading keeps the first row, repair rewrites, appending refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from lesiongen.diffusion.manifest import MANIFEST_COLUMNS, Manifest
from lesiongen.errors import InputError
from lesiongen.tables import read_image_table


def row(name: str, seed: int = 0) -> dict:
    return {**dict.fromkeys(MANIFEST_COLUMNS, ""), "file_name": name, "label": "mel", "dx": "mel", "seed": seed}


def test_appending_a_listed_file_is_refused_even_from_another_writer(tmp_path):
    first, second = Manifest(tmp_path / "manifest.csv"), Manifest(tmp_path / "manifest.csv")
    first.append(row("dataset/Melanoma/a.png"))
    first.append(row("dataset/Melanoma/b.png"))
    with pytest.raises(InputError, match="already lists dataset/Melanoma/a.png: another run is writing this folder"):
        second.append(row("dataset/Melanoma/a.png", seed=1))  # a second run that read the file before first wrote
    with pytest.raises(InputError, match="already lists dataset/Melanoma/b.png"):
        first.append(row("dataset/Melanoma/b.png"))
    second.append(row("dataset/Melanoma/c.png"))
    first.append(row("dataset/Melanoma/d.png"))  # sees c, written by the other writer, and adds d once
    assert [r["file_name"] for r in first.read()] == [f"dataset/Melanoma/{n}.png" for n in "abcd"]
    assert len((tmp_path / "manifest.csv").read_text().splitlines()) == 5  # header and four rows


def doubled(tmp_path: Path) -> Path:
    """The manifest two generations into one folder wrote: every image listed twice."""
    manifest = Manifest(tmp_path / "manifest.csv")
    for name in ("a", "b"):
        manifest.append(row(f"dataset/Melanoma/{name}.png"))
        (tmp_path / "dataset" / "Melanoma").mkdir(parents=True, exist_ok=True)
        (tmp_path / "dataset" / "Melanoma" / f"{name}.png").write_bytes(b"png")
    text = (tmp_path / "manifest.csv").read_text()
    (tmp_path / "manifest.csv").write_text(text + "".join(text.splitlines(keepends=True)[1:]))
    return tmp_path / "manifest.csv"


def test_a_doubled_manifest_reads_and_repairs_to_one_row_per_image(tmp_path):
    path = doubled(tmp_path)
    assert [r["file_name"] for r in Manifest(path).read()] == ["dataset/Melanoma/a.png", "dataset/Melanoma/b.png"]
    Manifest(path).repair(tmp_path)
    assert len(path.read_text().splitlines()) == 3
    assert read_image_table(path)["file_name"].tolist() == ["dataset/Melanoma/a.png", "dataset/Melanoma/b.png"]


def test_the_image_table_reader_counts_a_doubled_image_once(tmp_path):
    """The export and the classifier read manifests through it: a doubled row would be counted twice."""
    assert len(read_image_table(doubled(tmp_path))) == 2
