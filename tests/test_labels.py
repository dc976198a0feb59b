import pandas as pd
import pytest

from lesiongen import labels


def test_condition_resolves_names_and_codes_case_insensitively():
    for c in labels.CONDITIONS:
        assert labels.condition(c.code.upper()) is c
        assert labels.condition(f"  {c.name.lower()} ") is c
    assert labels.condition("melanoma").code == "mel"


def test_unknown_condition_lists_valid_names():
    with pytest.raises(KeyError, match="Melanocytic nevi"):
        labels.condition("psoriasis")


def test_seven_conditions_match_original_readme():
    assert labels.CODES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert {c.name for c in labels.CONDITIONS} == {
        "Melanoma",
        "Basal cell carcinoma",
        "Benign keratosis-like lesions",
        "Dermatofibroma",
        "Melanocytic nevi",
        "Vascular lesions",
        "Actinic keratoses and intraepithelial carcinoma",
    }


def test_every_derm7pt_diagnosis_maps(d7p_csv):
    diagnoses = set(pd.read_csv(d7p_csv)["diagnosis"])
    assert len(diagnoses) == 20
    mapped = {d: labels.d7p_to_code(d) for d in diagnoses}
    assert mapped["miscellaneous"] == labels.OTHER
    assert mapped["clark nevus"] == "nv" and mapped["melanoma (in situ)"] == "mel"
    assert mapped["seborrheic keratosis"] == "bkl"
    with pytest.raises(KeyError):
        labels.d7p_to_code("lichen planus")


def test_ham_localizations_all_have_a_site_group(ham_csv):
    sites = set(pd.read_csv(ham_csv)["localization"])
    assert sites <= set(labels.SITE_GROUPS)
    assert set(labels.D7P_SITES.values()) <= set(labels.SITE_GROUPS)


@pytest.mark.parametrize(
    "age,expected",
    [(None, "unknown"), (0, "0-29"), (29.9, "0-29"), (30, "30-44"), (59, "45-59"), (74, "60-74"), (85, "75+")],
)
def test_age_bins(age, expected):
    assert labels.age_bin(age) == expected


@pytest.mark.parametrize(
    "ita,tone",
    [
        (60, "very light"),
        (55.5, "very light"),
        (50, "light"),
        (30, "intermediate"),
        (15, "tan"),
        (0, "brown"),
        (-45, "dark"),
        (None, "unknown"),
    ],
)
def test_ita_bands(ita, tone):
    assert labels.skin_tone_from_ita(ita) == tone


def test_concept_values_cover_derm7pt(d7p_csv):
    df = pd.read_csv(d7p_csv)
    for concept in labels.CONCEPTS:
        assert set(df[concept.name]) <= set(concept.values), concept.name
        assert set(concept.phrases) == set(concept.values) - {"absent"}
