"""Metrics against values computed by hand for a six-image case."""

from __future__ import annotations

import numpy as np
import pytest

from lesiongen import labels
from lesiongen.classify.metrics import (
    balanced_accuracy,
    classification_metrics,
    majority_baseline,
    paired_differences,
    subgroup_metrics,
    t_interval,
    verdict,
    worst_group_summary,
)

Y_TRUE = ["mel", "mel", "nv", "nv", "nv", "bcc"]
Y_PRED = ["mel", "nv", "nv", "nv", "mel", "bcc"]
SEX = ["male", "male", "female", "female", "male", "female"]
SITE = ["trunk", "trunk", "trunk", "acral", "unknown", "acral"]


def test_overall_metrics_match_hand_computation():
    m = classification_metrics(Y_TRUE, Y_PRED)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    # recalls: mel 1/2, nv 2/3, bcc 1/1 -> mean over the three present classes
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3 + 1) / 3, abs=1e-6)
    # F1 equals recall here because each class's precision equals its recall
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1) / 3, abs=1e-6)
    assert m["per_class"]["mel"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["nv"]["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["per_class"]["df"] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0, "predicted": 0}
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (len(labels.CODES), len(labels.CODES))
    mel, nv = labels.CODES.index("mel"), labels.CODES.index("nv")
    assert cm[mel, mel] == 1 and cm[mel, nv] == 1 and cm[nv, mel] == 1 and cm[nv, nv] == 2
    assert cm.sum() == 6


def test_auc_one_vs_rest():
    classes = ["bcc", "mel", "nv"]
    proba = np.array(
        [[0.1, 0.8, 0.1], [0.1, 0.3, 0.6], [0.0, 0.2, 0.8], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3], [0.9, 0.05, 0.05]]
    )
    m = classification_metrics(Y_TRUE, Y_PRED, proba, classes=classes)
    # bcc's one positive has the highest bcc score: AUC 1. mel: positives 0.8, 0.3 vs negatives
    # 0.2, 0.1, 0.5, 0.05 -> 0.8 beats all 4, 0.3 beats 3 -> 7/8.
    assert m["auc_ovr"]["bcc"] == pytest.approx(1.0)
    assert m["auc_ovr"]["mel"] == pytest.approx(7 / 8)
    assert m["macro_auc"] == pytest.approx(np.mean(list(m["auc_ovr"].values())), abs=1e-6)


def test_auc_is_none_for_a_class_without_positives():
    proba = np.full((6, len(labels.CODES)), 1 / len(labels.CODES))
    m = classification_metrics(Y_TRUE, Y_PRED, proba)
    assert m["auc_ovr"]["df"] is None and m["auc_ovr"]["mel"] == pytest.approx(0.5)


def test_subgroups_worst_best_and_gap():
    s = subgroup_metrics(Y_TRUE, Y_PRED, {"sex": SEX, "site_group": SITE})
    sex = s["sex"]
    # male rows 0,1,4: one of three right; female rows 2,3,5: all right
    assert sex["groups"]["male"]["accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert sex["groups"]["male"]["balanced_accuracy"] == pytest.approx(0.25)  # mel 1/2, nv 0/1
    assert sex["groups"]["female"]["accuracy"] == 1.0
    assert sex["worst_group"] == "male" and sex["best_group"] == "female"
    assert sex["gap"] == pytest.approx(2 / 3, abs=1e-6)
    # an empty bin is listed, with no accuracy, and does not count as worst
    assert sex["groups"]["unknown"] == {"n": 0, "accuracy": None, "balanced_accuracy": None, "ranked": False}
    site = s["site_group"]
    # 'unknown' site (row 4, wrong) is reported but is not a group that can be worst
    assert site["groups"]["unknown"]["n"] == 1 and not site["groups"]["unknown"]["ranked"]
    assert site["worst_group"] == "trunk" and site["worst_accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert site["groups"]["head and neck"]["n"] == 0
    summary = worst_group_summary(s)
    assert summary["worst_group"] == "sex=male" and summary["max_gap_field"] == "sex"


def test_min_group_size_and_single_group():
    s = subgroup_metrics(Y_TRUE, Y_PRED, {"sex": SEX, "skin_tone": ["unknown"] * 6}, min_group_size=4)
    assert s["sex"]["worst_group"] is None and s["sex"]["gap"] is None
    assert s["skin_tone"]["worst_group"] is None
    assert worst_group_summary(s)["worst_group_accuracy"] is None
    with pytest.raises(ValueError, match="3 values for 6"):
        subgroup_metrics(Y_TRUE, Y_PRED, {"sex": SEX[:3]})


def test_majority_baseline_and_empty_input():
    base = majority_baseline(["nv", "nv", "mel"], Y_TRUE)
    assert base["class"] == "nv" and base["accuracy"] == pytest.approx(0.5)
    assert base["balanced_accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert balanced_accuracy([], []) is None
    assert classification_metrics([], [])["accuracy"] is None


def test_identical_predictions_differ_by_exactly_nothing():
    result = paired_differences(Y_TRUE, [Y_PRED], [Y_PRED], {"sex": SEX}, resamples=200)
    for metric in ("balanced_accuracy", "worst_sex", "worst_group_accuracy"):
        r = result[metric]
        assert (r["difference"], r["low"], r["high"]) == (0.0, 0.0, 0.0)
        assert r["verdict"] == "no difference shown"


def test_a_strictly_better_classifier_has_an_interval_above_zero():
    rng = np.random.default_rng(1)
    truth = rng.choice(["mel", "nv", "bcc"], 300).tolist()
    sex = rng.choice(["male", "female"], 300).tolist()
    worse = [t if i % 2 else "df" for i, t in enumerate(truth)]  # right on half of the images
    result = paired_differences(truth, [truth], [worse], {"sex": sex}, seed=3)
    ba = result["balanced_accuracy"]
    assert ba["a"] == 1.0 and ba["b"] == pytest.approx(balanced_accuracy(truth, worse))
    assert 0 < ba["low"] <= ba["difference"] <= ba["high"] and ba["verdict"] == "better"
    assert result["worst_sex"]["low"] > 0 and result["worst_group_accuracy"]["verdict"] == "better"
    flipped = paired_differences(truth, [worse], [truth], {"sex": sex}, seed=3)["balanced_accuracy"]
    assert flipped["verdict"] == "worse" and flipped["high"] < 0
    # the same seed gives the same interval
    assert paired_differences(truth, [truth], [worse], {"sex": sex}, seed=3)["balanced_accuracy"] == ba


def test_worst_group_difference_matches_subgroup_metrics_and_skips_absent_fields():
    a = ["mel", "mel", "nv", "nv", "nv", "bcc"]  # all right
    result = paired_differences(Y_TRUE, [a], [Y_PRED], {"sex": SEX, "skin_tone": ["unknown"] * 6}, resamples=50)
    sub = subgroup_metrics(Y_TRUE, Y_PRED, {"sex": SEX})
    assert result["worst_sex"]["b"] == pytest.approx(sub["sex"]["worst_accuracy"], abs=1e-6)
    assert result["worst_sex"]["difference"] == pytest.approx(1 - sub["sex"]["worst_accuracy"], abs=1e-6)
    assert "worst_skin_tone" not in result  # no skin tone stated: no worst group to compare


def test_seeds_add_a_t_interval_and_must_agree_for_a_verdict():
    truth = ["mel", "nv"] * 50
    wrong = ["nv", "mel"] * 50
    half = ["mel", "mel"] * 50  # recalls 1 and 0: balanced accuracy 0.5
    # seed 1: A right everywhere against B half right (+0.5); seed 2: A half right against B wrong everywhere (+0.5)
    steady = paired_differences(truth, [truth, half], [half, wrong], resamples=300)["balanced_accuracy"]
    assert steady["per_seed"] == [0.5, 0.5] and steady["seeds_low"] == steady["seeds_high"] == 0.5
    assert steady["verdict"] == "better"
    # +0.5 on one seed, -0.5 on the other: the seeds' interval spans 0, so nothing is shown
    mixed = paired_differences(truth, [truth, wrong], [half, half], resamples=300)["balanced_accuracy"]
    assert mixed["per_seed"] == [0.5, -0.5] and mixed["seeds_low"] < 0 < mixed["seeds_high"]
    assert mixed["verdict"] == "no difference shown"


def test_verdict_and_t_interval_known_values():
    assert verdict(0.01, 0.2) == "better" and verdict(-0.3, -0.01) == "worse"
    assert verdict(-0.1, 0.1) == verdict(0.0, 0.1) == verdict(None, None) == "no difference shown"
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert (low, high) == (pytest.approx(2 - 4.3027 / 3**0.5, abs=1e-3), pytest.approx(2 + 4.3027 / 3**0.5, abs=1e-3))
    assert t_interval([0.4]) == (None, None)
