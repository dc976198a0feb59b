"""Pure counterfactual-audit metrics: how often a classifier's answer changes when only the skin around the
lesion changes, and how its accuracy and true-positive rate differ between the asked values.

Every counterfactual of one lesion shares that lesion, so they are not independent draws: each interval is a
cluster bootstrap that redraws source images (with all their counterfactuals), never single counterfactuals.
Each statistic is a ratio of sums over rows, so a resample is a weighting of per-source sums (how often each
source was drawn) and 2000 resamples cost a few matrix products.

The input is one row per counterfactual, as ``lesiongen.audit.run`` writes ``manifest.csv``: ``source``,
``label`` (true dx code), ``value`` (the asked attribute value), ``pred`` and ``p_true`` (the classifier on the
counterfactual), ``base_pred`` and ``base_p_true`` (on the source image itself) and ``valid``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .. import labels

RESAMPLES = 2000
LEVEL = 0.95


def is_malignant(codes: Sequence[str]) -> np.ndarray:
    return np.isin(np.asarray(codes, dtype=object), sorted(labels.MALIGNANT))


def _ratios(values: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each statistic as (numerator column, denominator column) of the per-row indicator table."""
    out = {
        "flip_rate": ("flip", "one"),
        "flip_benign_to_malignant": ("flip_b2m", "base_benign"),
        "flip_malignant_to_benign": ("flip_m2b", "base_malignant"),
        "delta_p_true": ("delta_p", "one"),
    }
    for v in values:
        out[f"accuracy[{v}]"] = (f"correct[{v}]", f"n[{v}]")
        out[f"tpr[{v}]"] = (f"detected[{v}]", f"positive[{v}]")
    return out


def indicators(frame: pd.DataFrame, values: Sequence[str]) -> pd.DataFrame:
    """Per counterfactual, the 0/1 (or real) terms every statistic sums."""
    pred_m, base_m, true_m = is_malignant(frame["pred"]), is_malignant(frame["base_pred"]), is_malignant(frame["label"])
    out = pd.DataFrame(
        {
            "source": frame["source"].to_numpy(),
            "one": 1.0,
            "flip": (frame["pred"].to_numpy() != frame["base_pred"].to_numpy()).astype(float),
            "base_benign": (~base_m).astype(float),
            "base_malignant": base_m.astype(float),
            "flip_b2m": (~base_m & pred_m).astype(float),
            "flip_m2b": (base_m & ~pred_m).astype(float),
            "delta_p": frame["p_true"].to_numpy(float) - frame["base_p_true"].to_numpy(float),
        }
    )
    correct = (frame["pred"].to_numpy() == frame["label"].to_numpy()).astype(float)
    for v in values:
        here = (frame["value"].to_numpy() == v).astype(float)
        out[f"n[{v}]"] = here
        out[f"correct[{v}]"] = here * correct
        out[f"positive[{v}]"] = here * true_m
        out[f"detected[{v}]"] = here * true_m * pred_m
    return out


def _derived(stats: dict[str, np.ndarray], values: Sequence[str]) -> dict[str, np.ndarray]:
    """Worst-value accuracy and the equal-opportunity difference (largest minus smallest TPR between values)."""
    acc = np.stack([stats[f"accuracy[{v}]"] for v in values])
    tpr = np.stack([stats[f"tpr[{v}]"] for v in values])
    with warnings.catch_warnings():  # a resample with no malignant lesion has no TPR at all: NaN, said as None
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"worst_value_accuracy": np.nanmin(acc, axis=0), "eod": np.nanmax(tpr, axis=0) - np.nanmin(tpr, axis=0)}


def audit_statistics(
    frame: pd.DataFrame, values: Sequence[str], resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, dict]:
    """Each statistic on the valid counterfactuals, with a 95% cluster-bootstrap interval over source images.

    A statistic with no rows to count (say, the TPR of a value where no malignant lesion was edited) is None.
    """
    valid = frame[frame["valid"].astype(bool)]
    if valid.empty:
        return {}
    table = indicators(valid, values)
    sums = table.groupby("source", sort=True).sum(numeric_only=True)
    ratios = _ratios(values)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), (resamples, len(sums)))
    weights = np.stack([np.bincount(row, minlength=len(sums)) for row in draws]).astype(float)
    full = np.ones((1, len(sums)))
    point, boot = {}, {}
    for name, (num, den) in ratios.items():
        for target, w in ((point, full), (boot, weights)):
            with np.errstate(invalid="ignore", divide="ignore"):
                target[name] = (w @ sums[num].to_numpy()) / (w @ sums[den].to_numpy())
    point.update(_derived(point, values))
    boot.update(_derived(boot, values))
    out = {}
    for name, estimate in point.items():
        value = float(estimate[0])
        if not np.isfinite(value):
            out[name] = None
            continue
        low, high = np.nanquantile(boot[name], [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        out[name] = {"estimate": value, "low": float(low), "high": float(high)}
    return out


def validity_by_value(frame: pd.DataFrame, values: Sequence[str]) -> dict[str, dict]:
    """Per asked value: how many counterfactuals were made and kept, the lesion's mean change, the skin ITA reached."""
    out = {}
    for v in values:
        rows = frame[frame["value"] == v]
        kept = rows[rows["valid"].astype(bool)]
        ita = pd.to_numeric(rows["skin_ita_after"], errors="coerce")
        change = pd.to_numeric(rows["lesion_change"], errors="coerce")
        out[v] = {
            "made": len(rows),
            "valid": len(kept),
            "excluded": len(rows) - len(kept),
            "lesion_change_mean": float(change.mean()) if change.notna().any() else None,
            "skin_ita_mean": float(ita.mean()) if ita.notna().any() else None,
            "skin_ita_valid_mean": float(ita[rows["valid"].astype(bool)].mean())
            if ita[rows["valid"].astype(bool)].notna().any()
            else None,
        }
    return out


def interval_words(stat: dict | None, digits: int = 3) -> str:
    """ "0.120 [0.050, 0.200]", and "no effect shown" where the interval of a difference includes 0."""
    if stat is None:
        return "n/a (nothing to count)"
    text = f"{stat['estimate']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"
    return text if stat["low"] > 0 or stat["high"] < 0 else f"{text}, no effect shown"
