"""The one reader for image lists: build_captions splits, metadata.jsonl files and generation manifests.

Real and synthetic images reach the classifier, the evaluator and the reports through this reader, so
every consumer sees the same columns: an absolute ``path``, ``label`` (a dx code) and the metadata
columns, with the subgroup fields always present ("unknown" where the source has no value).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from . import labels
from .errors import InputError, not_utf8

MANIFEST = "manifest.csv"
METADATA = "metadata.jsonl"
SPLITS = ("train", "validation", "test")  # build_captions writes OUT/<split>/metadata.jsonl
MISSING_POLICIES = ("error", "skip")
# No text encoder reads more than 512 tokens (a few thousand characters): a longer caption is a wrong
# column or a hostile file, refused before any tokenizer spends minutes on it.
MAX_CAPTION_CHARS = 20_000
CAPTION_FIELDS = ("text", "long_text")


def read_metadata(path: str | Path) -> list[tuple[int, dict]]:
    """(1-based line, row) for every row of a ``metadata.jsonl``; a bad line is an InputError naming it.

    Training, classification, evaluation and reports all read build_captions' output through this one
    reader, so a file one stage accepts is accepted by all.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} row {i}", f"not valid JSON ({e.msg})", "fix or remove the line") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} row {i}", "is not a JSON object", "rebuild it with build_captions.py")
        for field in CAPTION_FIELDS:
            if isinstance(row.get(field), str) and len(row[field]) > MAX_CAPTION_CHARS:
                raise InputError(
                    f"{path} row {i}",
                    f"'{field}' is {len(row[field]):,} characters, past the {MAX_CAPTION_CHARS:,} any text encoder reads",
                    "shorten it, or rebuild the folder with build_captions.py",
                )
        rows.append((i, row))
    return rows


def leaves_folder(file_name: str) -> bool:
    """True when a row's ``file_name`` names a file outside its table's folder (an absolute path, or ``..`` past
    the folder): a metadata row must never make a stage read, train on or embed a file elsewhere, such as
    ``../secret.env``. Links inside the folder are followed: build_captions links the dataset's images in."""
    name = str(file_name)
    parts = Path(os.path.normpath(name)).parts
    return Path(name).is_absolute() or bool(Path(name).drive) or (bool(parts) and parts[0] == "..")


def find_tables(path: str | Path, split: str | None = None) -> list[Path]:
    """Resolve a user path to the table file(s) it means, or explain what was expected."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in (".jsonl", ".csv"):
            raise InputError(path, "is not a metadata.jsonl or manifest.csv", "pass a build_captions folder or a table")
        return [path]
    if not path.is_dir():
        raise InputError(path, "not found", "pass a build_captions output folder, a metadata.jsonl or a manifest.csv")
    for name in (MANIFEST, METADATA):
        if (path / name).is_file():
            return [path / name]
    present = [s for s in SPLITS if (path / s / METADATA).is_file()]
    if not present:
        raise InputError(
            path,
            f"has no {MANIFEST}, no {METADATA} and no <split>/{METADATA}",
            "pass the --output_dir folder of build_captions.py or the --output_dir of generate.py",
        )
    if split is None:
        return [path / s / METADATA for s in present]
    if split not in present:
        raise InputError(
            path, f"has no '{split}' split (found: {', '.join(present)})", "choose one of the found splits"
        )
    return [path / split / METADATA]


def _read_one(table: Path) -> pd.DataFrame:
    if table.suffix == ".jsonl":
        frame = pd.DataFrame([row for _, row in read_metadata(table)])
    else:
        try:
            frame = pd.read_csv(table, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise InputError(
                table, "is empty", "rerun generate.py, which writes the header with the first image"
            ) from None
        except UnicodeDecodeError:
            raise not_utf8(table) from None
        except pd.errors.ParserError as e:
            detail = str(e).strip().splitlines()[-1][:200]
            raise InputError(
                table, f"is not a readable CSV ({detail})", "pass the manifest.csv generate.py wrote"
            ) from None
    if frame.empty:
        raise InputError(table, "has no rows", "rebuild it, or point at a folder with images")
    if "label" not in frame.columns and "dx" in frame.columns:
        frame["label"] = frame["dx"]
    missing = [c for c in ("file_name", "label") if c not in frame.columns]
    if missing:
        raise InputError(
            table, f"missing column(s) {', '.join(missing)}", "write it with build_captions.py or generate.py"
        )
    # one row per file: a manifest two runs appended to lists images twice, which would count them twice; two
    # different rows naming one file (two images written over each other) cannot both be right, so they stop here
    frame = frame.drop_duplicates(ignore_index=True)
    doubled = frame["file_name"][frame["file_name"].duplicated()]
    if len(doubled):
        raise InputError(
            table,
            f"{len(doubled)} file(s) named by two different rows, e.g. {doubled.iloc[0]}",
            "regenerate the set into a new folder",
        )
    folder = table.parent
    frame["path"] = [os.path.abspath(folder / str(f)) for f in frame["file_name"]]
    frame["table"] = str(table)
    return frame


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Labels as stripped strings, numeric age, and every subgroup field present as a string."""
    frame["label"] = frame["label"].astype(str).str.strip()
    if "age" in frame.columns:
        frame["age"] = pd.to_numeric(frame["age"].replace("", None), errors="coerce").astype(float)
        absurd = frame["age"].notna() & ~frame["age"].between(0, labels.MAX_AGE)  # inf too
        if absurd.any():
            first = frame[absurd].iloc[0]
            raise InputError(
                f"{first['table']} row of {first['file_name']}",
                f"age {first['age']:g} is outside 0..{labels.MAX_AGE}",
                "fix the value, or leave it empty for an unknown age",
            )
    for name in labels.SUBGROUP_FIELDS:
        if name not in frame.columns:
            frame[name] = "unknown"
        values = frame[name].astype(object).where(frame[name].notna(), "unknown").astype(str).str.strip()
        frame[name] = values.replace({"": "unknown", "None": "unknown", "nan": "unknown"})
    return frame


def read_image_table(
    path: str | Path,
    split: str | None = None,
    on_missing: str = "error",
    keep_other: bool = False,
    skip_flag: str | None = None,
) -> pd.DataFrame:
    """Rows with an absolute ``path`` and their metadata; skipped rows are counted in ``frame.attrs``.

    Rows labelled 'other' (Derm7pt "miscellaneous") or with a label outside ``labels.CODES`` are
    dropped and counted (``keep_other=True`` keeps the 'other' rows), and so are rows naming a file outside
    their table's folder (``leaves_folder``) and generated images marked ``valid`` false; a missing image file is an
    ``InputError`` unless ``on_missing='skip'``, which counts it instead; its fix names ``skip_flag``,
    the caller's flag for skipping, when it has one. A build_captions folder with no ``split`` reads
    every split present. ``frame.attrs['skipped']`` maps reason -> file names.
    """
    if on_missing not in MISSING_POLICIES:
        raise ValueError(f"on_missing must be one of {MISSING_POLICIES}")
    tables = find_tables(path, split)
    frame = _normalise(pd.concat([_read_one(t) for t in tables], ignore_index=True))
    if split is not None and "split" in frame.columns:
        frame = frame[frame["split"] == split]

    skipped: dict[str, list[str]] = {}
    is_other = frame["label"] == labels.OTHER
    unknown = ~frame["label"].isin(labels.CODES) & ~is_other
    drop = unknown | (is_other & (not keep_other))
    if is_other.any() and not keep_other:
        skipped["label_other"] = frame.loc[is_other, "file_name"].tolist()
    if unknown.any():
        skipped["unknown_label"] = frame.loc[unknown, "file_name"].tolist()
    frame = frame[~drop]

    if "valid" in frame.columns:  # generation manifests: images sampled all one colour or from nan
        invalid = frame["valid"].astype(str).str.lower() == "false"
        if invalid.any():
            skipped["invalid_image"] = frame.loc[invalid, "file_name"].tolist()
            frame = frame[~invalid]

    outside = frame["file_name"].map(leaves_folder)
    if outside.any():
        skipped["outside_its_folder"] = frame.loc[outside, "file_name"].tolist()
        frame = frame[~outside]

    exists = frame["path"].map(os.path.isfile)
    if not exists.all():
        first = frame.loc[~exists].iloc[0]
        if on_missing == "error":
            raise InputError(
                first["table"],
                f"{int((~exists).sum())} listed image(s) not found, e.g. {first['file_name']}",
                "restore the images or rebuild the table" + (f", or skip them ({skip_flag})" if skip_flag else ""),
            )
        skipped["missing_image"] = frame.loc[~exists, "file_name"].tolist()
        frame = frame[exists]

    if frame.empty:
        raise InputError(
            path, f"no usable images (skipped: {_count_text(skipped)})", "check the labels and image files"
        )
    frame = frame.reset_index(drop=True)
    frame.attrs["skipped"] = skipped
    frame.attrs["source"] = str(path)
    if skipped:
        print(f"{path}{f' [{split}]' if split else ''}: skipped {_count_text(skipped)}", file=sys.stderr)
    return frame


def _count_text(skipped: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in skipped.items()) or "none"
