"""Lesion-grouped, diagnosis-stratified splits and grouped k-fold.

HAM10000 photographs one lesion several times; an image-level split would put the same lesion in
train and test, so every split here keeps all images of a ``lesion_id`` together.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import InputError, not_utf8

D7P_INDEX_FILES = {"train": "train_indexes.csv", "validation": "valid_indexes.csv", "test": "test_indexes.csv"}


def grouped_kfold(labels: Sequence[str], groups: Sequence[str], k: int, seed: int = 0) -> list[np.ndarray]:
    """Fold id per item: k diagnosis-stratified folds with no group in two folds."""
    n = len(labels)
    folds = np.full(n, -1)
    if len(set(groups)) < k:
        raise InputError(
            "--folds", f"{k} folds need at least {k} distinct lesions, got {len(set(groups))}", "use fewer folds"
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, idx) in enumerate(splitter.split(np.zeros(n), list(labels), list(groups))):
        folds[idx] = fold
    return [np.flatnonzero(folds == f) for f in range(k)]


def split_by_lesion(
    labels: Sequence[str], groups: Sequence[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> list[str]:
    """Assign train/validation/test per item, grouped by lesion and stratified by diagnosis.

    Built from 1/q-sized grouped stratified folds, with q chosen so the validation and test
    fractions are whole numbers of folds (0.1 -> 10 folds).
    """
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise InputError("--split_fractions", f"{fractions} must be non-negative and sum to 1", "e.g. 0.8 0.1 0.1")
    q = next(q for q in range(2, 101) if all(abs(f * q - round(f * q)) < 1e-6 for f in fractions))
    n_val, n_test = round(fractions[1] * q), round(fractions[2] * q)
    if n_val + n_test == 0:
        return ["train"] * len(labels)
    if len(set(groups)) < q:
        raise InputError(
            "--split_fractions",
            f"{fractions} needs at least {q} distinct lesions, got {len(set(groups))}",
            "use coarser fractions or more data",
        )
    check_class_sizes(labels, groups, q, fractions)
    with warnings.catch_warnings():  # said above in one line, naming the classes
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        folds = grouped_kfold(labels, groups, q, seed)
    out = ["train"] * len(labels)
    for f, idx in enumerate(folds):
        name = "test" if f < n_test else "validation" if f < n_test + n_val else "train"
        for i in idx:
            out[i] = name
    return out


def check_class_sizes(
    labels: Sequence[str], groups: Sequence[str], q: int, fractions: tuple[float, float, float]
) -> None:
    """Stratifying over q folds puts a class's images into q folds. When no class has q images the split cannot be
    made (scikit-learn's traceback before; now one line naming the largest class); classes with fewer than q
    lesions are said, since they may then miss the validation or test split."""
    images: dict[str, int] = {}
    lesions: dict[str, set[str]] = {}
    for label, group in zip(labels, groups, strict=True):
        images[label] = images.get(label, 0) + 1
        lesions.setdefault(label, set()).add(group)
    shown = " ".join(f"{f:g}" for f in fractions)
    largest = max(images, key=images.get)
    if images[largest] < q:
        raise InputError(
            "--split_fractions",
            f"{shown} cuts each class into {q} folds, and the largest class, {largest}, has {images[largest]} images",
            "pass coarser fractions such as --split_fractions 0.6 0.2 0.2 (5 folds), or 1 0 0 to keep all for training",
        )
    small = {label: len(g) for label, g in sorted(lesions.items()) if len(g) < q}
    if small:
        listed = ", ".join(f"{label} ({n})" for label, n in small.items())
        print(f"note: classes with fewer than {q} lesions may miss the validation or test split: {listed}")


def read_indexes(path: Path) -> pd.Series:
    """The 0-based meta.csv rows an official index file lists (its one column is named ``indexes``)."""
    fix = "pass --split_dir with Derm7pt's own train/valid/test_indexes.csv"
    try:
        frame = pd.read_csv(path)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        raise InputError(path, "is not a readable CSV file", fix) from None
    if "indexes" not in frame.columns:
        raise InputError(path, f"has no 'indexes' column (has: {', '.join(map(str, frame.columns))})", fix)
    idx = pd.to_numeric(frame["indexes"], errors="coerce")
    if idx.isna().any() or idx.empty:
        raise InputError(path, "lists a row index that is not a whole number, or none at all", fix)
    return idx.astype(int)


def d7p_official_splits(split_dir: str | Path, n_rows: int) -> list[str]:
    """The official Derm7pt split: index files hold 0-based row numbers of meta.csv."""
    split_dir = Path(split_dir)
    out = [""] * n_rows
    for split, name in D7P_INDEX_FILES.items():
        path = split_dir / name
        if not path.is_file():
            raise InputError(
                path, "split index file not found", "pass --split_dir with train/valid/test_indexes.csv, or omit it"
            )
        idx = read_indexes(path)
        if idx.max() >= n_rows or idx.min() < 0:
            raise InputError(
                path, f"index {idx.max()} is outside meta.csv's {n_rows} rows", "use the index files of this meta.csv"
            )
        for i in idx:
            out[i] = split
    return out
