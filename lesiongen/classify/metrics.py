"""Pure classification metrics: per class, balanced, one-vs-rest AUC, per subgroup and worst group.

The paper's claim is about the worst subgroup as much as the average, so every metric here can be
computed on any slice of the rows, and slices that are empty or too small are reported, never dropped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from .. import labels

# Values that mean "the metadata did not say"; such a group is reported but never the worst or best.
UNKNOWN = "unknown"
# The bins each subgroup field can take, so a bin with no rows is listed as empty rather than missing.
SUBGROUP_VALUES: dict[str, tuple[str, ...]] = {
    "sex": labels.SEXES,
    "age_bin": labels.AGE_BIN_NAMES,
    "site_group": labels.SITE_GROUP_NAMES,
    "skin_tone": labels.SKIN_TONE_NAMES,
}


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def balanced_accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float | None:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's definition; a class that is only
    predicted does not count), or None for no rows."""
    if len(y_true) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true": intended here
        return float(balanced_accuracy_score(np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)))


def majority_baseline(y_train: Sequence[str], y_true: Sequence[str]) -> dict:
    """What always predicting the most frequent training class scores on ``y_true``."""
    values, counts = np.unique(np.asarray(y_train), return_counts=True)
    majority = str(values[np.argmax(counts)])
    pred = [majority] * len(y_true)
    return {
        "class": majority,
        "accuracy": _clean(float(np.mean(np.asarray(y_true) == majority))),
        "balanced_accuracy": _clean(balanced_accuracy(y_true, pred)),
    }


def auc_one_vs_rest(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    """AUC of each class against the rest; None where a class has no positives or no negatives."""
    y_true = np.asarray(y_true)
    out: dict[str, float | None] = {}
    for j, c in enumerate(classes):
        positive = y_true == c
        out[c] = _clean(roc_auc_score(positive, proba[:, j])) if 0 < positive.sum() < len(y_true) else None
    return out


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], proba: np.ndarray | None = None, classes: Sequence[str] = labels.CODES
) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1, OvR AUC, confusion matrix.

    Macro-F1 averages over the classes present in ``y_true``, like balanced accuracy, so a class that
    the data does not contain neither helps nor hurts. ``proba`` columns follow ``classes``.
    """
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    classes = list(classes)
    n = len(y_true)
    if n == 0:
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "macro_f1": None}
    present = [c for c in classes if (y_true == c).any()]
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    per_class = {
        c: {
            "precision": _clean(precision[j]),
            "recall": _clean(recall[j]) if support[j] else None,
            "f1": _clean(f1[j]),
            "support": int(support[j]),
            "predicted": int((y_pred == c).sum()),
        }
        for j, c in enumerate(classes)
    }
    out = {
        "n": int(n),
        "accuracy": _clean(float(np.mean(y_true == y_pred))),
        "balanced_accuracy": _clean(balanced_accuracy(y_true, y_pred)),
        "macro_f1": _clean(float(np.mean([f1[classes.index(c)] for c in present]))) if present else None,
        "classes": classes,
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }
    if proba is not None:
        auc = auc_one_vs_rest(y_true, np.asarray(proba), classes)
        scored = [v for v in auc.values() if v is not None]
        out["auc_ovr"] = auc
        out["macro_auc"] = _clean(float(np.mean(scored))) if scored else None
    return out


def subgroup_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    min_group_size: int = 1,
) -> dict:
    """Per field (sex, age_bin, ...): accuracy per group, the worst and best group and their gap.

    Groups that are empty, 'unknown' or smaller than ``min_group_size`` are listed with their size
    but do not compete for worst/best; a field with fewer than two competing groups has no gap.
    """
    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    out: dict[str, dict] = {}
    for field, values in groups.items():
        values = np.asarray([str(v) for v in values], dtype=object)
        if len(values) != len(y_true):
            raise ValueError(f"subgroup field '{field}' has {len(values)} values for {len(y_true)} predictions")
        names = list(dict.fromkeys([*SUBGROUP_VALUES.get(field, ()), *sorted(set(values))]))
        per_group = {}
        for name in names:
            mask = values == name
            size = int(mask.sum())
            per_group[name] = {
                "n": size,
                "accuracy": _clean(float(np.mean(y_true[mask] == y_pred[mask]))) if size else None,
                "balanced_accuracy": _clean(balanced_accuracy(y_true[mask], y_pred[mask])) if size else None,
                "ranked": size >= max(1, min_group_size) and name != UNKNOWN,
            }
        ranked = {k: v["accuracy"] for k, v in per_group.items() if v["ranked"]}
        worst = min(ranked, key=ranked.get) if ranked else None
        best = max(ranked, key=ranked.get) if ranked else None
        out[field] = {
            "groups": per_group,
            "worst_group": worst,
            "worst_accuracy": ranked.get(worst),
            "best_group": best,
            "best_accuracy": ranked.get(best),
            "gap": _clean(ranked[best] - ranked[worst]) if len(ranked) >= 2 else None,
        }
    return out


def worst_group_summary(subgroups: Mapping[str, dict]) -> dict:
    """The single worst group over all fields, and the largest best-worst gap, for one-line tables."""
    candidates = [(v["worst_accuracy"], f, v["worst_group"]) for f, v in subgroups.items() if v["worst_group"]]
    gaps = [(v["gap"], f) for f, v in subgroups.items() if v["gap"] is not None]
    if not candidates:
        return {"worst_group": None, "worst_group_accuracy": None, "max_gap": None, "max_gap_field": None}
    acc, field, group = min(candidates)
    gap, gap_field = max(gaps) if gaps else (None, None)
    return {"worst_group": f"{field}={group}", "worst_group_accuracy": acc, "max_gap": gap, "max_gap_field": gap_field}


# Intervals of a difference between two classifiers scored on the same images (issue 34): a paired percentile
# bootstrap over the images, 2000 resamples at a fixed seed, and a t-interval over seeds where there are several.
RESAMPLES = 2000
LEVEL = 0.95
RESAMPLE_BLOCK = 250  # resamples computed at once, so memory stays near 250 x images whatever RESAMPLES is
NO_DIFFERENCE = "no difference shown"


def verdict(low: float | None, high: float | None) -> str:
    """ "better" or "worse" only when the interval excludes 0; the sign of the difference alone says nothing."""
    if low is None or high is None:
        return NO_DIFFERENCE
    return "better" if low > 0 else "worse" if high < 0 else NO_DIFFERENCE


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float | None, float | None]:
    """Student-t interval of the mean of ``values`` (one per seed); none from fewer than two."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None, None
    half = t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def _rates(keys: np.ndarray, hits: np.ndarray, rows: int, width: int) -> np.ndarray:
    """Per resample (row) and key (column): the share of hits, NaN where a key drew no image."""
    flat = (np.arange(rows)[:, None] * width + keys).ravel()
    ok = keys.ravel() >= 0
    counts = np.bincount(flat[ok], minlength=rows * width).reshape(rows, width)
    got = np.bincount(flat[ok], weights=hits.ravel()[ok], minlength=rows * width).reshape(rows, width)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, got / np.maximum(counts, 1), np.nan)


def _statistics(
    truth: np.ndarray, correct: np.ndarray, fields: dict[str, np.ndarray], idx: np.ndarray
) -> dict[str, np.ndarray]:
    """Balanced accuracy and worst-group accuracies of one classifier on each resample (rows of ``idx``)."""
    rows = len(idx)
    hits = correct[idx].astype(float)
    out = {"balanced_accuracy": np.nanmean(_rates(truth[idx], hits, rows, truth.max() + 1), axis=1)}
    worst = []
    for field, codes in fields.items():
        rates = _rates(codes[idx], hits, rows, max(codes.max() + 1, 1))
        out[f"worst_{field}"] = np.nanmin(np.where(np.isnan(rates), np.inf, rates), axis=1)
        worst.append(out[f"worst_{field}"])
    if worst:
        out["worst_group_accuracy"] = np.min(worst, axis=0)
    return out


def ranked_codes(values: Sequence[str], min_group_size: int) -> np.ndarray:
    """Group index per image, -1 for images of groups that cannot be the worst (unknown or too small), as in
    ``subgroup_metrics``: which groups compete is fixed by the full set, not redrawn per resample."""
    values = np.asarray([str(v) for v in values], dtype=object)
    names, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranked = (counts >= max(1, min_group_size)) & (names != UNKNOWN)
    index = np.cumsum(ranked) - 1
    return np.where(ranked[inverse], index[inverse], -1)


def paired_differences(
    y_true: Sequence[str],
    preds_a: Sequence[Sequence[str]],
    preds_b: Sequence[Sequence[str]],
    groups: Mapping[str, Sequence[str]] | None = None,
    min_group_size: int = 1,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, dict]:
    """Classifier(s) A minus classifier(s) B on the same images: balanced accuracy, worst-group accuracy over all
    ``groups`` fields and per field, each with a 95% interval and a verdict.

    ``preds_a`` and ``preds_b`` hold one prediction list per seed, paired by position. Each resample draws the
    images once and recomputes every metric for every seed, so the interval (``low``, ``high``) is that of the
    mean difference over seeds with the images redrawn; with two or more seeds ``seeds_low``/``seeds_high`` add
    a t-interval over the per-seed differences, and the verdict needs both to exclude 0 on the same side. A
    field with fewer than two groups that can be worst (say, skin tone where the data never states it) is left out.
    """
    truth_values = np.asarray(y_true, dtype=object)
    if len(preds_a) != len(preds_b) or not preds_a:
        raise ValueError(f"{len(preds_a)} prediction lists against {len(preds_b)}: pair one per seed")
    _, truth = np.unique(truth_values, return_inverse=True)
    correct = {
        side: [np.asarray(p, dtype=object) == truth_values for p in preds]
        for side, preds in (("a", preds_a), ("b", preds_b))
    }
    if any(len(c) != len(truth) for side in correct.values() for c in side):
        raise ValueError(f"every prediction list must have {len(truth)} entries, one per scored image")
    fields = {}
    for field, values in (groups or {}).items():
        codes = ranked_codes(values, min_group_size)
        if codes.max(initial=-1) >= 1:
            fields[field] = codes
    full = np.arange(len(truth))[None, :]
    point = {side: [_statistics(truth, c, fields, full) for c in cs] for side, cs in correct.items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {}
    for start in range(0, resamples, RESAMPLE_BLOCK):
        idx = rng.integers(0, len(truth), (min(RESAMPLE_BLOCK, resamples - start), len(truth)))
        per_seed = [
            (_statistics(truth, a, fields, idx), _statistics(truth, b, fields, idx))
            for a, b in zip(correct["a"], correct["b"], strict=True)
        ]
        for metric in per_seed[0][0]:
            draws.setdefault(metric, []).append(np.mean([a[metric] - b[metric] for a, b in per_seed], axis=0))
    out = {}
    for metric, blocks in draws.items():
        a = [float(s[metric][0]) for s in point["a"]]
        b = [float(s[metric][0]) for s in point["b"]]
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        low, high = np.nanquantile(np.concatenate(blocks), [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
        seeds_low, seeds_high = t_interval(diffs)
        said = verdict(float(low), float(high))
        if len(diffs) > 1 and verdict(seeds_low, seeds_high) != said:
            said = NO_DIFFERENCE
        out[metric] = {
            "a": float(np.mean(a)),
            "b": float(np.mean(b)),
            "difference": float(np.mean(diffs)),
            "low": float(low),
            "high": float(high),
            "per_seed": diffs,
            "seeds_low": seeds_low,
            "seeds_high": seeds_high,
            "verdict": said,
        }
    return out
