"""Faithfulness: do the pixels show what the prompt asked for?

Two measurements, both made by judges that never steer generation, filter samples or pick checkpoints:

- **Recognisability.** A classifier trained on real images (``classification/classifier.py``) names the
  condition of every generated image: per-condition recall, balanced accuracy and the confusion matrix,
  and the ratio to the same classifier's balanced accuracy on held-out real images (1.0 = as
  recognisable as real photographs). This is the "GAN-test" of Shmelkov et al. (ECCV 2018); its mirror,
  a classifier trained on synthetic images and scored on real ones, is the Classification Accuracy Score
  of Ravuri & Vinyals (NeurIPS 2019), which ``compare.py``'s synthetic-only row reports.
- **Paired steering.** Pairs from ``generate.py --contrast`` share seed, prompt and settings and differ in
  one switch; the mean paired difference of a measurement (a probe trained on expert concept labels, an
  analyzer descriptor, the skin ITA angle) with a bootstrap 95% interval. Pairing removes the variance of
  the seed, in which unpaired on/off comparisons drown.

Everything here works on arrays and frames; ``evaluate.run`` extracts the features and predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .. import labels
from ..classify.metrics import classification_metrics

BOOTSTRAP_SAMPLES = 2000
LEVEL = 0.95
# Analyzer descriptors (lesiongen.captions.analyze) that move with a switch. Blue-gray share and colour
# variability are calibrated against Derm7pt expert labels (docs/results.md: veil AUC 0.82, irregular
# pigmentation 0.74); the red share is a plain colour measure; ITA is the skin tone's own definition.
DESCRIPTORS: dict[str, str] = {
    "blue_whitish_veil": "blue_gray_pct",
    "regression_structures": "blue_gray_pct",
    "pigmentation": "color_variability",
    "vascular_structures": "red_pct",
    "skin_tone": "ita",
}
# Concept labels a probe may learn from: annotated by experts (Derm7pt) or stated by the data's metadata
# (the demo's built-in images draw exactly what their metadata says); never imputed ones.
OBSERVED_SOURCES = ("expert", "metadata")


def recognisability(asked: Sequence[str], proba: np.ndarray, real_balanced_accuracy: float | None = None) -> dict:
    """How a real-trained classifier reads generated images whose asked conditions are ``asked``.

    ``proba`` has one column per ``labels.CODES`` entry. Chance is one over the number of asked classes.
    """
    proba = np.asarray(proba, dtype=float)
    pred = [labels.CODES[i] for i in proba.argmax(1)]
    metrics = classification_metrics(list(asked), pred, proba)
    present = [c for c in labels.CODES if c in set(asked)]
    recall = {c: metrics["per_class"][c]["recall"] for c in present}
    balanced = metrics["balanced_accuracy"]
    return {
        "n": metrics["n"],
        "balanced_accuracy": balanced,
        "chance": 1.0 / len(present) if present else None,
        "recall": recall,
        "min_recall": min(recall.values()) if recall else None,
        "predicted": {c: metrics["per_class"][c]["predicted"] for c in labels.CODES},
        "real_balanced_accuracy": real_balanced_accuracy,
        "ratio": balanced / real_balanced_accuracy if real_balanced_accuracy else None,
        "overall": metrics,  # the shape classify.evaluate.plot_confusion draws
    }


def bootstrap_mean(values: Sequence[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Mean with a percentile bootstrap interval (level ``LEVEL``); ``excludes_zero`` when the interval does."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) < 2:
        return {"n": int(len(x)), "mean": float(x.mean()) if len(x) else None, "low": None, "high": None}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (samples, len(x)))].mean(1)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {
        "n": int(len(x)),
        "mean": float(x.mean()),
        "low": float(low),
        "high": float(high),
        "excludes_zero": bool(low > 0 or high < 0),
    }


def bootstrap_difference(a: np.ndarray, b: np.ndarray, statistic, seed: int = 0) -> dict:
    """``statistic(a) - statistic(b)`` for two independent samples of rows, with a percentile bootstrap
    interval (each sample resampled on its own), e.g. the recognisability of two caption styles."""
    rng = np.random.default_rng(seed)
    diffs = [
        statistic(a[rng.integers(0, len(a), len(a))]) - statistic(b[rng.integers(0, len(b), len(b))])
        for _ in range(BOOTSTRAP_SAMPLES // 2)
    ]
    low, high = np.quantile(diffs, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {
        "difference": float(statistic(a) - statistic(b)),
        "low": float(low),
        "high": float(high),
        "excludes_zero": bool(low > 0 or high < 0),
    }


def shared_files(frame: pd.DataFrame) -> list[str]:
    """Files a manifest lists under more than one prompt: one image cannot show two prompts."""
    if "text" not in frame.columns or "path" not in frame.columns:
        return []
    prompts = frame.groupby("path", sort=False)["text"].nunique()
    return [str(path) for path in prompts.index[prompts > 1]]


def pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per complete ``--contrast`` pair: ``pair``, ``contrast``, ``field``, ``on`` and ``off`` (row
    positions in ``frame``). Rows of unfinished pairs (one image on disk) are left out."""
    if "contrast" not in frame.columns or "pair" not in frame.columns:
        return pd.DataFrame(columns=["pair", "contrast", "field", "on", "off"])
    rows = []
    paired = frame[frame["contrast"].fillna("").astype(str) != ""]
    for (pair, contrast), group in paired.groupby(["pair", "contrast"], sort=False):
        field, _, values = str(contrast).partition("=")
        on_value, _, off_value = values.partition(":")
        column = field if field in frame.columns else None
        if column is None:
            continue
        on = group.index[group[column].astype(str) == on_value]
        off = group.index[group[column].astype(str) == off_value]
        if len(on) == 1 and len(off) == 1:
            rows.append({"pair": pair, "contrast": contrast, "field": field, "on": on[0], "off": off[0]})
    return pd.DataFrame(rows, columns=["pair", "contrast", "field", "on", "off"])


def paired_effects(table: pd.DataFrame, values: pd.Series | np.ndarray, seed: int = 0) -> dict:
    """Per contrast: the mean of ``values[on] - values[off]`` over its pairs, with a bootstrap interval.

    ``values`` is indexed like the frame ``table`` was built from (a measurement per generated image).
    """
    values = pd.Series(values) if not isinstance(values, pd.Series) else values
    out = {}
    for contrast, group in table.groupby("contrast", sort=False):
        diffs = (
            pd.to_numeric(values.loc[group["on"]], errors="coerce").to_numpy()
            - pd.to_numeric(values.loc[group["off"]], errors="coerce").to_numpy()
        )
        out[contrast] = bootstrap_mean(diffs[np.isfinite(diffs)], seed)
    return out


def descriptor_effects(table: pd.DataFrame, measured: pd.DataFrame, seed: int = 0) -> dict:
    """Paired effects of each contrast on the analyzer descriptor that belongs to its field (``DESCRIPTORS``)."""
    out = {}
    for field, group in table.groupby("field", sort=False):
        if field not in DESCRIPTORS:
            continue
        key = DESCRIPTORS[field]
        for contrast, effect in paired_effects(group, measured[key], seed).items():
            out[contrast] = {"descriptor": key, **effect}
    return out


def observed(frame: pd.DataFrame) -> np.ndarray:
    """Rows whose concept labels were observed (expert or metadata), not imputed: what a probe may learn from."""
    if "concept_source" not in frame.columns:
        return np.zeros(len(frame), bool)
    return frame["concept_source"].isin(OBSERVED_SOURCES).to_numpy()


def concept_present(values: pd.Series) -> pd.Series:
    """1 where the concept is visible (any value but 'absent'), 0 where absent, NaN where unknown."""
    known = values.notna() & values.astype(str).isin({v for c in labels.CONCEPTS for v in c.values})
    return (values != "absent").astype(float).where(known)


def train_probe(real: pd.DataFrame, features: np.ndarray, concept: str, seed: int = 0):
    """A logistic probe for one concept on real images with observed labels, and its cross-validated balanced
    accuracy; ``(None, note)`` when there are too few labelled images on either side."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = concept_present(real[concept]).to_numpy() if concept in real else np.full(len(real), np.nan)
    use = observed(real) & ~np.isnan(y)
    counts = np.bincount(y[use].astype(int), minlength=2) if use.any() else np.zeros(2, int)
    if counts.min() < 2:
        return None, {
            "note": f"needs >= 2 real images with and without {concept} labelled by experts or metadata "
            f"(got {counts.tolist()})"
        }
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, class_weight="balanced", max_iter=5000))
    folds = StratifiedKFold(int(min(5, counts.min())), shuffle=True, random_state=seed)
    cv = cross_val_score(probe, features[use], y[use].astype(int), cv=folds, scoring="balanced_accuracy")
    probe.fit(features[use], y[use].astype(int))
    return probe, {
        "probe_balanced_accuracy": float(cv.mean()),
        "n_real_with": int(counts[1]),
        "n_real_without": int(counts[0]),
    }


def ita_band_error(ita: float | None, band: str) -> float | None:
    """Degrees between a measured ITA and the asked band's interval (0 inside it; labels.SKIN_TONES bands)."""
    if ita is None or not np.isfinite(ita) or band not in labels.SKIN_TONE_NAMES:
        return None
    i = labels.SKIN_TONE_NAMES.index(band)
    lower = labels.SKIN_TONES[i][1]
    upper = labels.SKIN_TONES[i - 1][1] if i > 0 else 90.0
    return float(max(lower - ita, ita - upper, 0.0))


def skin_tone_agreement(asked: pd.Series, ita: pd.Series) -> dict:
    """Per asked band: images, how many had a measurable ITA, the share measured in the same band, the
    median ITA and the mean absolute distance to the band (``ita_band_error``); overall the same."""
    ita = pd.to_numeric(ita, errors="coerce")
    out: dict = {"bands": {}}
    errors, agree = [], []
    for band in labels.SKIN_TONE_NAMES:
        rows = (asked == band).to_numpy()
        if not rows.any():
            continue
        got = ita[rows].dropna()
        same = [labels.skin_tone_from_ita(v) == band for v in got]
        err = [ita_band_error(v, band) for v in got]
        errors += err
        agree += same
        out["bands"][band] = {
            "n": int(rows.sum()),
            "n_measured": int(len(got)),
            "measured_same": float(np.mean(same)) if same else None,
            "median_ita": float(got.median()) if len(got) else None,
            "ita_error": float(np.mean(err)) if err else None,
        }
    out["agreement"] = float(np.mean(agree)) if agree else None
    out["ita_error"] = float(np.mean(errors)) if errors else None
    return out
