"""Structured reports: source priority and disagreements, the condensed and long captions, and the
``--reporter`` integration of build_captions.py on real Derm7pt images."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from lesiongen import labels
from lesiongen.captions import analyze, reports
from lesiongen.captions.build import BuildCaptionsConfig, build
from lesiongen.captions.metadata import LesionRecord
from lesiongen.captions.text import MEASURED_PHRASES, caption, report_caption, report_long_text
from lesiongen.errors import InputError
from lesiongen.files import read_jsonl
from lesiongen.tokens import count_tokens


def fits(text: str) -> bool:
    return count_tokens(text) <= 77


def measured(**over) -> dict:
    """A plausible measured dict (a uniform brown lesion on light skin) with overrides."""
    m = {
        "area_pct": 20.0,
        "cut_off": False,
        "colors": {"light_brown": 0.6, "dark_brown": 0.4, "black": 0.0, "blue_gray": 0.0, "red": 0.0, "white": 0.0},
        "color_variability": 12.0,
        "color_asymmetry": 4.0,
        "shape_asymmetry": 0.05,
        "blue_gray_pct": 1.0,
        "red_pct": 0.0,
        "hair_pct": 3.0,
        "ita": 60.0,
        "skin_tone": "very light",
        "mask_ok": True,
    }
    m.update(over)
    return m


def record(source: str = "expert", **concepts) -> LesionRecord:
    base = {c.name: "absent" for c in labels.CONCEPTS}
    base.update(concepts)
    return LesionRecord(
        "img1", "les1", "d7p", "mel", "melanoma", None, 55.0, "female", "back", "flat", "unknown", base, source
    )


def test_expert_beats_measurement_and_the_disagreement_is_counted():
    rec = record("expert")
    rep = reports.build_report(rec, measured(blue_gray_pct=40.0))
    assert "blue_gray" not in rep["claims"]
    assert rep["disagreements"] == [
        {
            "field": "blue_gray",
            "kept": "expert",
            "kept_value": str({"blue_whitish_veil": "absent", "regression_structures": "absent"}),
            "dropped": "measured",
            "dropped_value": "True",
        }
    ]
    assert "blue-gray" not in report_caption(rec, rep, 0, fits).text


def test_measurement_beats_imputed_concepts():
    rec = record("imputed")
    rep = reports.build_report(rec, measured(blue_gray_pct=40.0, color_variability=25.0))
    assert rep["claims"] == ["blue_gray", "variegated"]
    assert rep["fields"]["blue_gray"] == {"value": True, "source": "measured", "score": 40.0}
    assert rep["fields"]["patterns"]["value"]["blue_whitish_veil"] is None  # the imputed guess is dropped
    assert {(d["field"], d["kept"], d["dropped"]) for d in rep["disagreements"]} == {
        ("blue_gray", "measured", "imputed"),
        ("colour_variability", "measured", "imputed"),
    }
    text = report_caption(rec, rep, 0, fits).text
    assert "blue-gray areas" in text and "variegated pigmentation" in text
    assert "no blue-whitish veil" not in text and "no blotches" not in text


def test_agreeing_expert_keeps_the_claim_without_disagreement():
    rec = record("expert", blue_whitish_veil="present", pigmentation="diffuse irregular")
    rep = reports.build_report(rec, measured(blue_gray_pct=40.0, color_variability=25.0, color_asymmetry=20.0))
    assert rep["claims"] == ["blue_gray", "variegated", "color_asymmetry"] and rep["disagreements"] == []


def test_measured_skin_tone_fills_unknown_and_metadata_wins_a_conflict():
    rep = reports.build_report(record(), measured(ita=47.0, skin_tone="light"))
    assert rep["fields"]["skin_tone"] == {"value": "light", "source": "measured", "score": 47.0}
    assert "light skin" in report_caption(record(), rep, 0, fits).text
    rec = record()
    rec.skin_tone = "brown"
    rep = reports.build_report(rec, measured(ita=47.0, skin_tone="light"))
    assert rep["fields"]["skin_tone"]["value"] == "brown" and rep["fields"]["skin_tone"]["source"] == "metadata"
    assert rep["disagreements"][0]["field"] == "skin_tone"


def test_unmeasurable_image_adds_nothing_and_equals_the_concept_caption():
    rec = record("expert", pigment_network="atypical")
    rep = reports.build_report(rec, analyze.empty_measurement())
    assert rep["claims"] == [] and rep["fields"]["size"]["value"] is None
    assert set(rep["measured"]) == set(analyze.MEASURED_KEYS)
    assert report_caption(rec, rep, 3, fits).text == caption(rec, "concept", 3, fits).text
    assert "could not be measured" in report_long_text(rec, rep)


def test_frame_claims_and_long_text():
    rec = record("expert")
    rep = reports.build_report(rec, measured(area_pct=70.0, cut_off=True, color_variability=8.0))
    assert rep["claims"] == ["uniform", "large", "cut_off"]
    text = report_caption(rec, rep, 0, fits).text
    for claim in rep["claims"]:
        assert MEASURED_PHRASES[claim] in text
    long_text = report_long_text(rec, rep)
    assert long_text.startswith("Dermoscopic image of melanoma")
    assert "70% of the image" in long_text and "extends beyond the field of view" in long_text
    assert "light brown 60%" in long_text and "55-year-old female" in long_text


def test_vlm_fields_fill_what_the_analyzer_cannot_measure():
    vlm = dict.fromkeys(reports.VLM_FIELDS)
    vlm.update(
        border_definition="sharp, regular",
        texture="smooth",
        skin_tone="intermediate",
        dermoscopic_patterns="reticular network",
    )
    rec = record("imputed")
    rep = reports.build_report(rec, measured(), vlm, "melanoma, dark network")
    assert rep["fields"]["border"] == {"value": "sharp, regular", "source": "vlm", "score": None}
    assert rep["fields"]["skin_tone"]["source"] == "measured"  # a measurement beats the vlm
    assert rep["fields"]["vlm_patterns"]["value"] == "reticular network"  # the vlm beats imputation
    kinds = {(d["field"], d["kept"], d["dropped"]) for d in rep["disagreements"]}
    assert ("skin_tone", "measured", "vlm") in kinds and ("patterns", "vlm", "imputed") in kinds
    text = report_caption(rec, rep, 0, fits).text
    assert "reticular network" in text and "sharp, regular border" in text and "no pigment network" not in text
    assert rep["vlm_prompt"] == "melanoma, dark network"


def test_every_text_fits_clip_with_the_diagnosis_first_even_when_overloaded():
    vlm = {k: "a very long free text description of many words " * 3 for k in reports.VLM_FIELDS}
    for dx in labels.CODES:
        rec = record(
            "expert",
            pigment_network="atypical",
            streaks="irregular",
            pigmentation="diffuse irregular",
            regression_structures="combinations",
            dots_and_globules="irregular",
            blue_whitish_veil="present",
            vascular_structures="dotted",
        )
        rec.dx = dx
        rep = reports.build_report(
            rec,
            measured(area_pct=80.0, cut_off=True, color_variability=30.0, color_asymmetry=30.0, blue_gray_pct=50.0),
            vlm,
        )
        cap = report_caption(rec, rep, 1, fits)
        assert count_tokens(cap.text) <= 77
        assert labels.BY_CODE[dx].phrase in cap.text.split(",")[0]
        assert cap.omitted  # something had to go, and it is recorded


def test_reporter_flags():
    cfg = BuildCaptionsConfig(dataset="d7p", metadata="m.csv", output_dir="o")
    assert reports.resolve_reporters(cfg, "concept", True) == ("metadata", "image")
    assert reports.resolve_reporters(cfg, "concept", False) == ("metadata",)
    assert reports.resolve_reporters(cfg, "label", True) == ("metadata",)
    cfg.reporter = "image"
    assert reports.resolve_reporters(cfg, "concept", True) == ("metadata", "image")
    with pytest.raises(InputError, match="--reporter.*needs --images"):
        reports.resolve_reporters(cfg, "concept", False)
    with pytest.raises(InputError, match="needs --style concept"):
        reports.resolve_reporters(cfg, "label", True)
    cfg.reporter = "metadata,vlm"
    with pytest.raises(InputError, match="vlm needs --vlm_base_url and --vlm_model"):
        reports.resolve_reporters(cfg, "concept", True)
    cfg.reporter = "image,ocr"
    with pytest.raises(InputError, match="unknown reporter.*ocr.*metadata, image, vlm"):
        reports.resolve_reporters(cfg, "concept", True)


@pytest.fixture(scope="session")
def d7p_subset(tmp_path_factory, d7p_csv, d7p_images):
    """40 Derm7pt cases with images (every 15th), as their own metadata CSV."""
    meta = pd.read_csv(d7p_csv)
    meta = meta[[(d7p_images / p).is_file() for p in meta["derm"]]].iloc[::15]
    folder = tmp_path_factory.mktemp("d7p_subset")
    meta.to_csv(folder / "meta.csv", index=False)
    return folder / "meta.csv", len(meta)


def test_build_captions_stores_report_and_long_text(tmp_path, d7p_subset, d7p_images):
    csv, n = d7p_subset
    cfg = BuildCaptionsConfig(dataset="d7p", metadata=str(csv), images=str(d7p_images), output_dir=str(tmp_path / "o"))
    summary = build(cfg)
    rows = read_jsonl(tmp_path / "o" / "captions.jsonl")
    assert len(rows) == n and summary["reports"]["sources"] == ["metadata", "image"]
    assert summary["reports"]["mask_ok"] >= n - 2
    split_rows = [
        r
        for s in ("train", "validation", "test")
        if (tmp_path / "o" / s / "metadata.jsonl").is_file()
        for r in read_jsonl(tmp_path / "o" / s / "metadata.jsonl")
    ]
    assert len(split_rows) == n
    for row in split_rows:
        rep = reports.row_report(row)
        assert list(rep["measured"]) == list(analyze.MEASURED_KEYS)
        assert row["n_tokens"] == count_tokens(row["text"]) <= 77
        if row["dx"] in labels.BY_CODE:
            assert labels.BY_CODE[row["dx"]].phrase in row["text"].split(",")[0]  # diagnosis first
        assert row["long_text"].startswith("Dermoscopic image of") and len(row["long_text"]) > len(row["text"]) / 2
        if rep["measured"]["mask_ok"] and rep["measured"]["skin_tone"] != "unknown":
            assert row["skin_tone"] == rep["measured"]["skin_tone"]  # the subgroup column is the measured tone
        rec = LesionRecord.from_row(row)
        assert report_caption(rec, rep, row["caption_seed"], fits).text == row["text"]  # re-captions exactly
    claimed = [c for r in split_rows for c in reports.row_report(r)["claims"]]
    assert claimed, "no measured claim in 40 real images"
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["reports"]["claims"]


def test_label_style_and_metadata_reporter_keep_their_output(tmp_path, d7p_subset, d7p_images):
    csv, _ = d7p_subset
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    build(
        BuildCaptionsConfig(
            dataset="d7p", metadata=str(csv), images=str(d7p_images), output_dir=str(out_a), style="label"
        )
    )
    build(BuildCaptionsConfig(dataset="d7p", metadata=str(csv), output_dir=str(out_b), reporter="metadata"))
    for out, style in ((out_a, "label"), (out_b, "concept")):
        for row in read_jsonl(out / "captions.jsonl"):
            assert "report" not in row and "long_text" not in row
            assert row["text"] == caption(LesionRecord.from_row(row), style, row["caption_seed"], fits).text


def test_build_captions_cli_rejects_bad_reporter(tmp_path, d7p_subset):
    csv, _ = d7p_subset
    from lesiongen.captions.build import main

    assert main(["--dataset", "d7p", "--metadata", str(csv), "--out", str(tmp_path), "--reporter", "image"]) == 2
    assert not os.listdir(tmp_path)
