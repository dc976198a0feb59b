import random

import pandas as pd
import pytest

from lesiongen import labels
from lesiongen.captions import concepts


def test_table_matches_counts_computed_from_derm7pt(d7p_csv):
    raw = pd.read_csv(d7p_csv)
    raw["dx"] = raw["diagnosis"].map(labels.d7p_to_code)
    shipped = pd.read_csv(concepts.TABLE_PATH, keep_default_na=False)
    for dx in ("bcc", "bkl", "df", "mel", "nv", "vasc"):
        sub = raw[raw["dx"] == dx]
        for concept in labels.CONCEPT_NAMES:
            direct = sub[concept].value_counts()
            rows = shipped[(shipped.dx == dx) & (shipped.concept == concept)].set_index("value")
            for value, count in rows["count"].items():
                assert count == direct.get(value, 0), (dx, concept, value)
            assert rows["support"].iloc[0] == len(sub)
    akiec = shipped[shipped.dx == "akiec"]
    assert (akiec["pooled_from"] == "bcc+bkl").all()
    assert akiec["support"].iloc[0] == ((raw["dx"] == "bcc") | (raw["dx"] == "bkl")).sum()


def test_regenerated_table_equals_shipped(tmp_path, d7p_csv):
    out = tmp_path / "freq.csv"
    assert concepts.main(["--d7p_metadata", str(d7p_csv), "--out", str(out)]) == 0
    assert out.read_text() == concepts.TABLE_PATH.read_text()


def test_imputation_follows_the_table():
    rng = random.Random(0)
    draws = [concepts.impute_concepts("mel", rng) for _ in range(3000)]
    table = pd.read_csv(concepts.TABLE_PATH, keep_default_na=False)
    expected = table[(table.dx == "mel") & (table.concept == "blue_whitish_veil") & (table.value == "present")][
        "frequency"
    ].iloc[0]
    observed = sum(d["blue_whitish_veil"] == "present" for d in draws) / len(draws)
    assert observed == pytest.approx(expected, abs=0.03)
    assert all(set(d) == set(labels.CONCEPT_NAMES) for d in draws)
    assert concepts.impute_concepts("other", rng) == {}
