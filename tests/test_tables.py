"""read_image_table on the real Derm7pt build and on a small fake generation manifest."""

from __future__ import annotations

import json
import os

import pytest
from builders import write_manifest

from lesiongen import labels
from lesiongen.errors import InputError
from lesiongen.tables import read_image_table


def test_build_captions_folder_by_split(d7p_built):
    train = read_image_table(d7p_built, "train")
    # 413 train images, 3 of them Derm7pt 'miscellaneous' (label other): counted, not silently dropped
    assert len(train) == 410
    assert len(train.attrs["skipped"]["label_other"]) == 3
    assert set(train["label"]) <= set(labels.CODES)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in train["path"])
    assert {"lesion_id", "text", *labels.SUBGROUP_FIELDS, *labels.CONCEPT_NAMES} <= set(train.columns)
    assert set(train["skin_tone"]) <= {*labels.SKIN_TONE_NAMES, "unknown"} and set(train["sex"]) <= set(labels.SEXES)
    both = read_image_table(d7p_built)
    assert both["split"].value_counts().to_dict() == {"train": 410, "validation": 200}
    kept = read_image_table(d7p_built / "validation" / "metadata.jsonl", keep_other=True)
    assert len(kept) == 203 and (kept["label"] == labels.OTHER).sum() == 3


def test_manifest_folder_and_file(tmp_path):
    write_manifest(tmp_path, [{"label": "mel"}, {"label": "nv", "sex": ""}, {"label": "xyz"}])
    for source in (tmp_path, tmp_path / "manifest.csv"):
        frame = read_image_table(source)
        assert frame["label"].tolist() == ["mel", "nv"]
        assert frame.attrs["skipped"] == {"unknown_label": ["dataset/xyz/xyz_000002.png"]}
        assert frame["path"][0] == str(tmp_path / "dataset" / "Melanoma" / "mel_000000.png")
        assert frame["sex"].tolist() == ["female", "unknown"]  # blank subgroup value -> unknown
        assert frame["age"].dtype == float and frame["guidance_scale"][0] == "7.5"


def test_missing_image_is_an_error_or_a_counted_skip(tmp_path):
    write_manifest(tmp_path, [{"label": "mel"}, {"label": "nv"}])
    (tmp_path / "dataset" / "Melanoma" / "mel_000000.png").unlink()
    with pytest.raises(InputError, match=r"manifest.csv: 1 listed image\(s\) not found, e.g. dataset/Melanoma") as err:
        read_image_table(tmp_path)
    assert "--skip_missing" not in str(err.value)  # evaluate, the demo: no such flag to name
    with pytest.raises(InputError, match=r"not found.*rebuild the table, or skip them \(--skip_missing\)"):
        read_image_table(tmp_path, skip_flag="--skip_missing")
    frame = read_image_table(tmp_path, on_missing="skip")
    assert frame["label"].tolist() == ["nv"] and len(frame.attrs["skipped"]["missing_image"]) == 1


def test_missing_subgroup_columns_become_unknown(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label": "bcc"}) + "\n")
    frame = read_image_table(tmp_path)
    assert all(frame[f][0] == "unknown" for f in labels.SUBGROUP_FIELDS)


def test_bad_paths_and_tables(tmp_path, d7p_built):
    with pytest.raises(InputError, match="not found"):
        read_image_table(tmp_path / "nope")
    with pytest.raises(InputError, match="has no manifest.csv, no metadata.jsonl"):
        read_image_table(tmp_path)
    with pytest.raises(InputError, match=r"has no 'test' split \(found: train, validation\)"):
        read_image_table(d7p_built, "test")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="is not a metadata.jsonl or manifest.csv"):
        read_image_table(tmp_path / "notes.txt")
    (tmp_path / "manifest.csv").write_text("")
    with pytest.raises(InputError, match="is empty"):
        read_image_table(tmp_path)
    (tmp_path / "manifest.csv").write_text("name,label\na.png,mel\n")
    with pytest.raises(InputError, match="missing column"):
        read_image_table(tmp_path)
    (tmp_path / "manifest.csv").write_text("file_name,label\na.png,other\n")
    with pytest.raises(InputError, match="no usable images"):
        read_image_table(tmp_path)


def test_a_table_that_is_not_utf8_names_the_line_and_how_to_convert_it(tmp_path):
    write_manifest(tmp_path, [{"label": "mel"}, {"label": "nv"}])
    text = (tmp_path / "manifest.csv").read_text()
    (tmp_path / "manifest.csv").write_bytes(text.replace("dermoscopic image", "dermoscopic imagé").encode("latin-1"))
    with pytest.raises(InputError, match=r"manifest.csv line 2: is not UTF-8 text \(byte 0xe9\); .*iconv -f latin1"):
        read_image_table(tmp_path)


def test_a_caption_no_encoder_could_read_is_refused_before_any_tokenizer_sees_it(tmp_path):
    from lesiongen.tables import MAX_CAPTION_CHARS, read_metadata

    table = tmp_path / "metadata.jsonl"
    rows = [{"file_name": "a.png", "text": "melanoma"}, {"file_name": "b.png", "text": "x" * (MAX_CAPTION_CHARS + 1)}]
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InputError, match=r"row 2: 'text' is 20,001 characters") as e:
        read_metadata(table)
    assert str(table) in e.value.where
    rows[1]["text"], rows[1]["long_text"] = "nevus", "y" * (MAX_CAPTION_CHARS + 5)
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(InputError, match="'long_text' is 20,005 characters"):
        read_metadata(table)


def test_a_row_never_makes_a_stage_read_a_file_outside_its_folder(tmp_path, capsys):
    """Issue 32: a metadata row naming ``../other/x.png`` or an absolute path made the classifier, the evaluator
    and diffusion training read that file. The shared reader skips and counts such rows; training, which stops
    on any bad row, refuses them naming the row."""
    import numpy as np
    from PIL import Image

    from lesiongen.diffusion.dataset import read_examples

    outside = tmp_path / "private" / "photo.png"
    outside.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(data / "images" / "ok.png")
    names = ["images/ok.png", "../private/photo.png", str(outside), "images/../../private/photo.png"]
    lines = [json.dumps({"file_name": n, "label": "mel", "text": "melanoma"}) for n in names]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    frame = read_image_table(data)
    assert frame["file_name"].tolist() == ["images/ok.png"]
    assert frame.attrs["skipped"] == {"outside_its_folder": names[1:]}
    assert "skipped 3 outside its folder" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"metadata.jsonl row 2: file_name '../private/photo.png' is outside"):
        read_examples(data)


@pytest.mark.parametrize("age", ["Infinity", "-Infinity", "1e999", "500"])
def test_an_age_that_is_not_finite_or_out_of_range_names_the_row(tmp_path, age):
    """Issue 32: json reads ``Infinity`` and pandas reads ``1e999`` as inf, which reached the age bins; ages
    from build_captions are checked on the way in, and a table handed over is checked the same way."""
    import numpy as np
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "metadata.jsonl").write_text(f'{{"file_name": "images/a.png", "label": "mel", "age": {age}}}\n')
    with pytest.raises(InputError, match=r"metadata.jsonl row of images/a.png: age .* is outside 0\.\.120"):
        read_image_table(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "images/a.png", "label": "mel", "age": 45}\n')
    assert read_image_table(tmp_path)["age"].tolist() == [45.0]
