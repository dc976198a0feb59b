"""The audit's statistics on known answers, with cluster-bootstrap intervals over source images."""

from __future__ import annotations

import pandas as pd
import pytest

from lesiongen.audit.metrics import audit_statistics, interval_words, validity_by_value

VALUES = ("very light", "dark")


def counterfactuals(n_sources: int, answer) -> pd.DataFrame:
    """Half melanomas, half nevi, each source edited to both values; ``answer(label, value)`` is the prediction."""
    rows = []
    for s in range(n_sources):
        label = "mel" if s % 2 else "nv"
        for value in VALUES:
            pred = answer(label, value)
            rows.append(
                dict(
                    source=f"img{s}.png",
                    label=label,
                    value=value,
                    pred=pred,
                    p_true=0.9 if pred == label else 0.1,
                    base_pred=label,
                    base_p_true=0.9,
                    valid=True,
                    lesion_change=0.5,
                    skin_ita_after=60.0 if value == "very light" else -40.0,
                )
            )
    return pd.DataFrame(rows)


def test_a_classifier_that_ignores_the_skin_never_flips():
    stats = audit_statistics(counterfactuals(40, lambda label, value: label), VALUES, resamples=300)
    assert stats["flip_rate"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    assert stats["eod"]["estimate"] == 0.0 and stats["worst_value_accuracy"]["estimate"] == 1.0
    assert stats["delta_p_true"]["estimate"] == 0.0
    assert interval_words(stats["flip_rate"]).endswith("no effect shown")


def test_a_classifier_that_calls_dark_skin_benign_flips_one_way_and_has_unequal_opportunity():
    frame = counterfactuals(40, lambda label, value: "nv" if value == "dark" else label)
    stats = audit_statistics(frame, VALUES, resamples=300)
    assert stats["flip_rate"]["estimate"] == pytest.approx(0.25)  # melanomas on dark skin: a quarter of all edits
    assert stats["flip_malignant_to_benign"]["estimate"] == pytest.approx(0.5)
    assert stats["flip_benign_to_malignant"]["estimate"] == 0.0
    assert stats["tpr[very light]"]["estimate"] == 1.0 and stats["tpr[dark]"]["estimate"] == 0.0
    assert stats["eod"]["estimate"] == 1.0 and stats["worst_value_accuracy"]["estimate"] == 0.5
    assert 0.1 < stats["flip_rate"]["low"] < 0.25 < stats["flip_rate"]["high"] < 0.4
    assert stats["delta_p_true"]["estimate"] == pytest.approx(-0.2)
    assert "no effect shown" not in interval_words(stats["flip_rate"])


def test_invalid_edits_are_excluded_and_counted_per_value():
    frame = counterfactuals(10, lambda label, value: "nv" if value == "dark" else label)
    frame.loc[frame["value"] == "dark", "valid"] = False  # every flip came from an edit that failed validity
    stats = audit_statistics(frame, VALUES, resamples=100)
    assert stats["flip_rate"]["estimate"] == 0.0 and stats["tpr[dark]"] is None
    validity = validity_by_value(frame, VALUES)
    assert validity["dark"] == {
        "made": 10,
        "valid": 0,
        "excluded": 10,
        "lesion_change_mean": 0.5,
        "skin_ita_mean": -40.0,
        "skin_ita_valid_mean": None,
    }
    assert validity["very light"]["valid"] == 10
    assert audit_statistics(frame.assign(valid=False), VALUES) == {}
