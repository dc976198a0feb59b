"""A generated set exported as parquet loads with datasets as users load it (whole, by parquet glob, streamed),
with the manifest's rows, named labels and the exact pixels; a killed export resumes; bad input is one line."""

from __future__ import annotations

import csv
import shutil

import datasets
import numpy as np
import pytest
from PIL import Image

from lesiongen import labels
from lesiongen.diffusion.export import ExportConfig, export, main


def manifest_rows(folder) -> list[dict]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        return sorted(csv.DictReader(f), key=lambda r: r["file_name"])


def check_row(got: dict, want: dict, folder, label_names: list[str]) -> None:
    assert label_names[got["label"]] == want["label"]
    for name, value in want.items():
        if name in ("label", "valid", "invalid_reason"):  # every exported image is valid: not a column
            continue
        if name in ("seed", "num_inference_steps", "index"):
            assert got[name] == int(value), name
        elif name in ("age", "guidance_scale", "strength", "lesion_change", "skin_ita_before", "skin_ita_after",
                      "skin_spread_after"):  # fmt: skip
            assert got[name] == (None if value == "" else pytest.approx(float(value))), name
        else:
            assert got[name] == value, name
    pixels = np.asarray(Image.open(folder / want["file_name"]).convert("RGB"))
    assert np.array_equal(np.asarray(got["image"].convert("RGB")), pixels), want["file_name"]


@pytest.fixture(scope="module")
def exported(fake_generation, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "synth-hf"
    result = export(ExportConfig(input_dir=str(fake_generation), output_dir=str(out), rows_per_shard=8))
    return out, result


def test_export_loads_whole_and_by_parquet_glob_with_the_manifest_rows(exported, fake_generation, tmp_path):
    out, result = exported
    want = manifest_rows(fake_generation)
    assert result.rows == len(want) and result.shards == -(-len(want) // 8) and result.written == result.shards
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        f"train-{i:05d}-of-{result.shards:05d}.parquet" for i in range(result.shards)
    ]
    by_folder = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    by_glob = datasets.load_dataset(
        "parquet", data_files=str(out / "data" / "train-*.parquet"), split="train", cache_dir=str(tmp_path / "hf2")
    )
    for ds in (by_folder, by_glob):
        assert len(ds) == len(want)
        names = ds.features["label"].names
        assert names == list(labels.CODES) and isinstance(ds.features["image"], datasets.Image)
        for got, row in zip(ds, want, strict=True):
            check_row(got, row, fake_generation, names)
    assert f"{len(want)} images" in (out / "README.md").read_text()


def test_export_streams_without_a_local_copy(exported, fake_generation):
    out, _ = exported
    want = manifest_rows(fake_generation)
    stream = datasets.load_dataset(str(out), split="train", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    names = stream.features["label"].names
    got = list(stream.take(10))
    assert len(got) == 10
    for g, w in zip(got, want[:10], strict=True):
        check_row(g, w, fake_generation, names)


def test_killed_export_resumes_keeping_complete_shards(exported, fake_generation, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exported[0], out)
    data = out / "data"
    shards = sorted(data.iterdir())
    kept = {p.name: p.stat().st_mtime_ns for p in shards[1:]}
    shards[0].unlink()
    (data / f".{shards[0].name}.abc.tmp").write_bytes(b"half a parquet file")
    (data / "train-00000-of-00099.parquet").write_bytes(b"from an export of another size")
    result = export(ExportConfig(input_dir=str(fake_generation), output_dir=str(out), rows_per_shard=8))
    assert result.written == 1
    assert sorted(p.name for p in data.iterdir()) == [p.name for p in shards]
    assert all((data / n).stat().st_mtime_ns == t for n, t in kept.items())
    shards[1].write_bytes(shards[2].read_bytes())  # a complete file holding the wrong rows is rewritten
    assert export(ExportConfig(input_dir=str(fake_generation), output_dir=str(out), rows_per_shard=8)).written == 1


def test_missing_manifest_and_bad_flags_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "gen").mkdir()
    assert main(["--input_dir", str(tmp_path / "gen"), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no manifest.csv" in err
    assert (
        main(["--input_dir", str(tmp_path / "gen"), "--output_dir", str(tmp_path / "o"), "--rows_per_shard", "0"]) == 2
    )
    assert "--rows_per_shard" in capsys.readouterr().err


def test_only_images_inside_the_set_are_embedded(fake_generation, tmp_path, capsys):
    """Issue 32: the export embedded whatever file a manifest row named (``../secret.env``, an absolute path, a
    link out of the folder) into the parquet. Rows whose file leaves the set's folder, once paths and links are
    resolved, or is not an image are left out and counted in one line; the images are exported as before."""
    import pyarrow.parquet as pq

    gen = shutil.copytree(fake_generation, tmp_path / "gen", symlinks=True)
    secret = tmp_path / "secret.env"
    secret.write_bytes(b"API_KEY=sk-do-not-ship")
    outside_png = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside_png)
    folder = gen / "dataset" / "Melanoma"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "link.png").symlink_to(outside_png)
    (folder / "notes.png").write_bytes(b"API_KEY=sk-do-not-ship, named like an image")
    rows = manifest_rows(gen)
    hostile = ["../secret.env", str(secret), "dataset/Melanoma/link.png", "dataset/Melanoma/notes.png"]
    with open(gen / "manifest.csv", "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        for i, name in enumerate(hostile):
            writer.writerow({**rows[0], "file_name": name, "index": 1000 + i})

    out = tmp_path / "hf"
    assert main(["--input_dir", str(gen), "--output_dir", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    # the reader every stage shares drops names that leave the folder as written; the export also resolves links
    assert f"{gen / 'manifest.csv'}: skipped 2 outside its folder" in lines
    assert any(
        x.startswith(f"{gen / 'manifest.csv'}: left out 2 row(s) (1 outside the set's folder, 1 not an image")
        for x in lines
    ), lines
    table = pq.read_table(next((out / "data").glob("*.parquet")))
    assert sorted(table.column("file_name").to_pylist()) == [r["file_name"] for r in rows]
    assert all(b"sk-do-not-ship" not in image["bytes"] for image in table.column("image").to_pylist())


def test_a_manifest_number_that_is_not_finite_is_one_line(fake_generation, tmp_path, capsys):
    """Issue 32: ``float()`` read a guidance of ``inf`` into the parquet's float column."""
    gen = shutil.copytree(fake_generation, tmp_path / "gen")
    rows = manifest_rows(gen)
    rows[0]["guidance_scale"] = "inf"
    with open(gen / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["--input_dir", str(gen), "--output_dir", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"row of {rows[0]['file_name']}: guidance_scale 'inf' is not a finite number" in err
    assert err.count("\n") == 1
