from dataclasses import replace

import pytest

from lesiongen import labels
from lesiongen.captions.metadata import LesionRecord
from lesiongen.captions.text import STYLES, caption, concept_phrases

MEL = LesionRecord(
    image_id="I1",
    lesion_id="L1",
    dataset="d7p",
    dx="mel",
    age=45.0,
    sex="female",
    site="back",
    elevation="palpable",
    concepts={
        "pigment_network": "atypical",
        "streaks": "irregular",
        "pigmentation": "absent",
        "regression_structures": "absent",
        "dots_and_globules": "irregular",
        "blue_whitish_veil": "present",
        "vascular_structures": "absent",
    },
    concept_source="expert",
)


def test_label_style_is_the_paper_baseline():
    assert caption(MEL, "label").text == "a dermoscopic image of melanoma"
    akiec = LesionRecord("I2", "L2", "ham10000", "akiec")
    assert caption(akiec, "label").text == "a dermoscopic image of actinic keratosis or intraepithelial carcinoma"


def test_concept_style_states_diagnosis_concepts_and_demographics():
    text = caption(MEL, "concept", seed=0).text
    assert "melanoma" in text
    for phrase in ("atypical pigment network", "irregular streaks", "irregular dots and globules", "blue-whitish veil"):
        assert phrase in text
    for phrase in ("no blotches", "no regression", "no vessels"):
        assert phrase in text
    assert "back" in text and "45" in text and ("female" in text or "woman" in text) and "palpable" in text


def test_diagnosis_comes_first_and_present_before_absent():
    for seed in range(20):
        text = caption(MEL, "concept", seed=seed).text
        assert text.index("melanoma") < text.index("blue-whitish veil") < text.index("no vessels")


def test_same_seed_same_caption_and_seeds_vary_phrasing():
    assert caption(MEL, "concept", seed=3) == caption(MEL, "concept", seed=3)
    assert len({caption(MEL, "concept", seed=s).text for s in range(20)}) >= 5


def test_caption_does_not_depend_on_other_records():
    other = LesionRecord("I9", "L9", "ham10000", "nv")
    first = caption(MEL, "concept", seed=1).text
    caption(other, "concept", seed=1)
    assert caption(MEL, "concept", seed=1).text == first


def test_shortening_drops_only_tail_facts_and_records_them():
    full = caption(MEL, "concept", seed=0)
    short = caption(MEL, "concept", seed=0, fits=lambda t: len(t) < len(full.text) - 5)
    assert short.omitted and short.omitted[0] == "absent_concepts"
    assert "blue-whitish veil" in short.text and "melanoma" in short.text
    with pytest.raises(ValueError, match="exceeds the token window"):
        caption(MEL, "concept", seed=0, fits=lambda t: False)


def test_unknown_style_lists_valid():
    with pytest.raises(KeyError, match="label, concept"):
        caption(MEL, "poem")


def test_every_concept_value_has_a_phrase():
    for concept in labels.CONCEPTS:
        for value in concept.values:
            present, absent = concept_phrases({concept.name: value})
            assert present if value != "absent" else absent


def test_unknown_fields_are_left_out():
    bare = LesionRecord("I3", "L3", "ham10000", "bcc")
    text = caption(bare, "concept", seed=0).text
    assert "basal cell carcinoma" in text and "unknown" not in text and "None" not in text


@pytest.mark.parametrize("style", list(STYLES))
def test_each_style_names_the_diagnosis(style):
    for c in labels.CONDITIONS:
        rec = LesionRecord("I", "L", "ham10000", c.code, age=80.0, sex="male", site="face")
        text = caption(rec, style, seed=0).text
        assert c.phrase in text
        assert "a 80" not in text


@pytest.mark.parametrize("concept", labels.CONCEPTS, ids=lambda c: c.name)
def test_switching_one_concept_changes_only_that_concepts_phrase(concept):
    """--contrast pairs rely on it: same opener, same demographics, same order of the other concepts."""
    others = [
        c.phrases[MEL.concepts[c.name]] for c in labels.CONCEPTS if c != concept and MEL.concepts[c.name] != "absent"
    ]
    for value in concept.values[1:]:
        on = replace(MEL, concepts={**MEL.concepts, concept.name: value})
        off = replace(MEL, concepts={**MEL.concepts, concept.name: "absent"})
        for seed in range(8):
            a, b = caption(on, "concept", seed=seed).text, caption(off, "concept", seed=seed).text
            assert concept.phrases[value] in a and concept.absent_phrase in b
            assert concept.phrases[value] not in b.replace(concept.absent_phrase, "")
            assert sorted(others, key=a.index) == sorted(others, key=b.index)
            assert a.split(",")[0] == b.split(",")[0]  # the same opener
            tail = "back" if "back" in a else None
            assert a[a.index(tail) :].split(", no ")[0] == b[b.index(tail) :].split(", no ")[0]  # same demographics
