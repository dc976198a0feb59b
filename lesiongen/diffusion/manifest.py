"""``manifest.csv``: the record of a generated set, one row per image that is on disk.

Rows are appended (locked, fsynced) only after their image has been renamed into place, so the
manifest never lists a missing image, a kill loses at most the row being written, and a rerun skips
every image it lists. Its columns are build_captions' ``metadata.jsonl`` columns plus the sampling
settings, so the classifier and the evaluator read real and synthetic images alike. Its rows, with
numbers typed, are also written as ``metadata.jsonl`` beside it, which makes the folder a Hugging Face
imagefolder.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from .. import labels
from ..errors import InputError
from ..files import write_jsonl, write_text
from ..tables import METADATA

try:  # serialises manifest appends from several processes; absent on Windows, where runs are single-process
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MANIFEST_COLUMNS: tuple[str, ...] = (
    "file_name",
    "text",
    "label",
    "condition",
    "dx",
    "sex",
    "age",
    "age_bin",
    "site",
    "site_group",
    "skin_tone",
    *labels.CONCEPT_NAMES,
    "concept_source",
    "seed",
    "guidance_scale",
    "num_inference_steps",
    "scheduler",
    "model",
    "negative_prompt",
    "index",
    "pair",  # a --contrast pair's shared image id; empty otherwise
    "contrast",  # the pair's switch, 'field=on:off'
    # false for an image that is all one colour or held nan/inf when sampled (generate.invalid_reason): kept, so
    # a rerun does not redo it, but left out of every reader (tables.read_image_table) and of exports
    "valid",
    "invalid_reason",
)
VALIDITY_COLUMNS = ("valid", "invalid_reason")
# what a dataset of the set carries (metadata.jsonl, the parquet export): the valid images, so not these two
DATASET_COLUMNS = tuple(c for c in MANIFEST_COLUMNS if c not in VALIDITY_COLUMNS)


# Columns stored as numbers outside the CSV (metadata.jsonl, the parquet export); every other column is a string.
INTEGER_COLUMNS = ("seed", "num_inference_steps", "index")
FLOAT_COLUMNS = ("age", "guidance_scale")


def typed_row(row: dict, source: str | Path) -> dict:
    """A manifest row's dataset columns with its number columns as numbers (an unknown age as None); a value that
    is not a finite number is an InputError naming ``source`` and the image."""
    out = {}
    for name in DATASET_COLUMNS:
        value = row.get(name, "")
        try:
            if name in INTEGER_COLUMNS:
                value = int(value)
            elif name in FLOAT_COLUMNS:
                value = None if value in ("", None) or value != value else float(value)
                if value is not None and not math.isfinite(value):
                    raise ValueError
        except ValueError:
            raise InputError(
                f"{source} row of {row.get('file_name')}",
                f"{name} '{value}' is not a finite number",
                "regenerate the row or fix the value",
            ) from None
        out[name] = value
    return out


class Manifest:
    """``manifest.csv``: rows appended (locked, fsynced) only once their image has been renamed into place."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict]:
        """Rows of complete lines; a line torn by a kill mid-append is ignored."""
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames and tuple(reader.fieldnames) != MANIFEST_COLUMNS:
            raise InputError(self.path, "has different columns than this version writes", "use a new --output_dir")
        return list(reader)

    def repair(self, root: Path, drop: set[str] = frozenset()) -> list[dict]:
        """Keep one row per image that exists (and is not in ``drop``); rewrite the file only if that changed."""
        rows, seen, kept = self.read(), set(), []
        for r in rows:
            if r["file_name"] in seen or r["file_name"] in drop or not (root / r["file_name"]).is_file():
                continue
            seen.add(r["file_name"])
            kept.append(r)
        raw = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        if len(kept) != len(rows) or (raw and not raw.endswith("\n")):
            write_text(self.path, _csv_text([dict(zip(MANIFEST_COLUMNS, MANIFEST_COLUMNS, strict=True)), *kept]))
        return kept

    def write_metadata(self) -> None:
        """``metadata.jsonl`` beside the manifest: its rows, typed, under imagefolder's ``file_name``, written whole
        (atomically), so ``datasets.load_dataset("imagefolder", data_dir=...)`` reads exactly the listed images.
        Invalid images are not listed, so a dataset never holds them. With no rows there is no file: imagefolder
        cannot read an empty one."""
        rows = [r for r in self.read() if r["valid"] != "false"]
        path = self.path.with_name(METADATA)
        if rows:
            write_jsonl(path, [typed_row(r, self.path) for r in rows])
        else:
            path.unlink(missing_ok=True)

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            header = os.fstat(f.fileno()).st_size == 0
            lines = [dict(zip(MANIFEST_COLUMNS, MANIFEST_COLUMNS, strict=True))] if header else []
            f.write(_csv_text([*lines, row]))
            f.flush()
            os.fsync(f.fileno())


def _csv_text(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()
