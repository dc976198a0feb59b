"""``manifest.csv``: the record of a generated set, one row per image that is on disk.

Rows are appended (locked, fsynced) only after their image has been renamed into place, so the
manifest never lists a missing image, a kill loses at most the row being written, and a rerun skips
every image it lists. Its columns are build_captions' ``metadata.jsonl`` columns plus the sampling
settings, so the classifier and the evaluator read real and synthetic images alike.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from .. import labels
from ..errors import InputError
from ..files import write_text

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
    "source",  # edit/augment: the real image it was made from, its path as given; empty otherwise
    "strength",  # edit/augment: the SDEdit strength
    "lesion_change",  # --keep lesion: mean absolute pixel change inside the kept region, 0-255
    "skin_ita_before",  # --keep lesion: ITA of the skin ring around it in the source, and in the edit
    "skin_ita_after",
)


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
