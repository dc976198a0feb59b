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
from ..files import naming_failures, write_jsonl, write_text
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
    "source",  # edit/augment: the real image it was made from, its absolute path; empty otherwise
    "strength",  # edit/augment: the SDEdit strength
    "lesion_change",  # --keep lesion: mean absolute pixel change inside the kept region, 0-255
    "skin_ita_before",  # --keep lesion: ITA of the skin ring around it in the source, and in the edit
    "skin_ita_after",
    "skin_spread_after",  # --keep lesion: the colour spread (a*b*) of that ring in the edit: noise scatters widely
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
FLOAT_COLUMNS = (
    "age", "guidance_scale", "strength", "lesion_change", "skin_ita_before", "skin_ita_after", "skin_spread_after",
)  # fmt: skip


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
    """``manifest.csv``: rows appended (locked, fsynced) only once their image has been renamed into place, and
    never one file twice (two rows for one image would count it twice in the export and the classifier)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listed: set[str] = set()  # the file names in the first ``_parsed`` bytes of the file
        self._parsed = 0

    def _rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames and tuple(reader.fieldnames) != MANIFEST_COLUMNS:
            raise InputError(self.path, "has different columns than this version writes", "use a new --output_dir")
        return list(reader)

    def read(self) -> list[dict]:
        """Rows of complete lines, the first for each file; a line torn by a kill mid-append is ignored."""
        seen: set[str] = set()
        return [r for r in self._rows() if not (r["file_name"] in seen or seen.add(r["file_name"]))]

    def repair(self, root: Path, drop: set[str] = frozenset()) -> list[dict]:
        """Keep one row per image that exists (and is not in ``drop``); rewrite the file only if that changed."""
        rows, kept = self._rows(), []
        for r in self.read():
            if r["file_name"] not in drop and (root / r["file_name"]).is_file():
                kept.append(r)
        raw = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        if len(kept) != len(rows) or (raw and not raw.endswith("\n")):
            self.rewrite(kept)
        return kept

    def rewrite(self, rows: Sequence[dict]) -> None:
        """Replace the file with ``rows`` under its header, atomically (the filter stage marks rows invalid so)."""
        write_text(self.path, _csv_text([dict(zip(MANIFEST_COLUMNS, MANIFEST_COLUMNS, strict=True)), *rows]))

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
        """Append one row under the file's lock; a file it already lists is an error, never a second row."""
        with naming_failures(self.path), open(self.path, "ab+") as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)
            size = os.fstat(f.fileno()).st_size
            if size < self._parsed:  # rewritten (repaired) since: read it again
                self._listed, self._parsed = set(), 0
            f.seek(self._parsed)
            tail = f.read()
            tail = tail[: tail.rfind(b"\n") + 1]
            self._listed.update(r[0] for r in csv.reader(io.StringIO(tail.decode("utf-8"))) if r)
            self._parsed += len(tail)
            if row["file_name"] in self._listed:
                raise InputError(
                    self.path,
                    f"already lists {row['file_name']}: another run is writing this folder",
                    "let one run finish, or use a new --output_dir",
                )
            lines = [dict(zip(MANIFEST_COLUMNS, MANIFEST_COLUMNS, strict=True))] if size == 0 else []
            f.write(_csv_text([*lines, row]).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


def _csv_text(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()
