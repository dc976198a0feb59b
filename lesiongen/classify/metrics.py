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
