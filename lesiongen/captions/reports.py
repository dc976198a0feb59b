"""The structured lesion report: fields with a value, a source and (where measured) a score, merged
from expert annotations, metadata, image measurements, an optional vision-language model and imputation.

Priority when two sources speak about the same thing: expert (and metadata) > a confident
measurement > vlm > imputed. A measurement is stated only through a calibrated ``Claim``; where a
higher-priority source contradicts a lower one, the higher wins and the disagreement is recorded.
The caption text itself is written by ``captions.report_caption`` / ``captions.report_long_text``.

Every report has the same JSON shape (same keys, same value types, nulls where unknown) so that an
imagefolder ``metadata.jsonl`` holding it loads with pyarrow / ``datasets`` without schema conflicts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import labels
from ..cli import option
from ..errors import InputError
from ..tokens import count_tokens
from .analyze import MEASURED_KEYS, analysis_workers, measure_files
from .metadata import LesionRecord
from .text import Caption, report_caption, report_long_text, reported_record
from .vlm import DEFAULT_KEY_ENV, VLM_FIELDS, VLMClient, api_key_from_env

REPORT_VERSION = 1
REPORTERS: tuple[str, ...] = ("metadata", "image", "vlm")
SOURCES: tuple[str, ...] = ("expert", "metadata", "measured", "vlm", "imputed")
# lower is stronger; metadata columns are facts recorded with the image, as strong as an expert label
PRIORITY: dict[str, int] = {"expert": 0, "metadata": 0, "measured": 1, "vlm": 2, "imputed": 3}

# Report fields whose only source is the vlm: the analyzer measures them near chance (issue 9).
VLM_ONLY_FIELDS: dict[str, str] = {
    "border": "border_definition",
    "texture": "texture",
    "shape": "shape",
    "shape_variability": "shape_variability",
    "other": "other_features",
}
FIELDS: tuple[str, ...] = (
    "diagnosis",
    "age",
    "sex",
    "site",
    "elevation",
    "patterns",
    "blue_gray",
    "colours",
    "colour_variability",
    "colour_distribution",
    "size",
    "cut_off",
    "skin_tone",
    *VLM_ONLY_FIELDS,
    "vlm_patterns",
)


def _blue_areas(c: Mapping) -> bool:
    return c.get("blue_whitish_veil") == "present" or c.get("regression_structures") in ("blue areas", "combinations")


def _irregular_pigmentation(c: Mapping) -> bool:
    return "irregular" in str(c.get("pigmentation") or "")


# Expert labels (Derm7pt checklist values) that a measured descriptor is calibrated against.
EXPERT_TARGETS: dict[str, Callable[[Mapping], bool]] = {
    "blue_whitish_veil": lambda c: c.get("blue_whitish_veil") == "present",
    "blue_areas": _blue_areas,
    "no_blue_areas": lambda c: not _blue_areas(c),
    "irregular_pigmentation": _irregular_pigmentation,
    "no_irregular_pigmentation": lambda c: not _irregular_pigmentation(c),
    "white_regression": lambda c: c.get("regression_structures") in ("white areas", "combinations"),
    "vessels": lambda c: c.get("vascular_structures") not in (None, "absent"),
}


BLUE_CONCEPTS = ("blue_whitish_veil", "regression_structures")


@dataclass(frozen=True)
class Claim:
    """One hedged statement the analyzer may make: ``key`` above/below ``threshold``.

    ``threshold`` was chosen on the Derm7pt train split by ``benchmarks/bench_analyze.py`` as the
    loosest one whose precision against ``target`` reaches ``target_precision``; its precision on the
    valid split is in DATASET_INFO.md. ``concepts`` are the checklist concepts it speaks about.
    """

    name: str  # key of captions.MEASURED_PHRASES
    field: str  # report field it sets
    key: str  # measured descriptor
    direction: str  # "above" | "below"
    threshold: float
    target: str  # EXPERT_TARGETS name
    target_precision: float
    concepts: tuple[str, ...]
    value: str | bool  # the field value it states

    def holds(self, measured: Mapping) -> bool:
        x = measured.get(self.key)
        if not measured.get("mask_ok") or x is None:
            return False
        return x >= self.threshold if self.direction == "above" else x <= self.threshold


# Thresholds printed as "calibrated on train" by benchmarks/bench_analyze.py (Derm7pt train split);
# precision on the valid split is in DATASET_INFO.md. Derm7pt has no asymmetry label: colour
# asymmetry is calibrated against irregular pigmentation and checked on PH2's expert asymmetry.
# fmt: off
CLAIMS: tuple[Claim, ...] = (
    Claim("blue_gray", "blue_gray", "blue_gray_pct", "above", 7.66, "blue_areas", 0.6, BLUE_CONCEPTS, True),
    Claim("no_blue_gray", "blue_gray", "blue_gray_pct", "below", 0.08, "no_blue_areas", 0.8, BLUE_CONCEPTS, False),
    Claim("variegated", "colour_variability", "color_variability", "above", 17.22, "irregular_pigmentation", 0.6,
          ("pigmentation",), "variegated"),
    Claim("uniform", "colour_variability", "color_variability", "below", 10.05, "no_irregular_pigmentation", 0.88,
          ("pigmentation",), "uniform"),
    Claim("color_asymmetry", "colour_distribution", "color_asymmetry", "above", 13.73, "irregular_pigmentation", 0.6,
          (), "asymmetric"),
)
# fmt: on
CLAIM_BY_NAME: dict[str, Claim] = {c.name: c for c in CLAIMS}
LARGE_AREA_PCT = 50.0  # "fills most of the frame": a definition, not a calibrated estimate
SPOKEN_CLAIMS = ("blue_gray", "variegated", "uniform", "color_asymmetry", "large", "cut_off")  # text order


def parse_reporters(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"metadata,image,vlm"`` -> a validated tuple; metadata is always included."""
    items = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    names = tuple(dict.fromkeys(n.strip().lower() for n in items if n.strip()))
    unknown = [n for n in names if n not in REPORTERS]
    if unknown or not names:
        raise InputError(
            "--reporter",
            f"unknown reporter(s) {', '.join(unknown) or '(none)'}",
            f"use a comma list of {', '.join(REPORTERS)}",
        )
    return tuple(dict.fromkeys(("metadata", *names)))


def _field(value=None, source: str | None = None, score: float | None = None) -> dict:
    return {"value": value, "source": source if value is not None else None, "score": score}


def _disagreement(field: str, kept: str, kept_value, dropped: str, dropped_value) -> dict:
    return {
        "field": field,
        "kept": kept,
        "kept_value": str(kept_value),
        "dropped": dropped,
        "dropped_value": str(dropped_value),
    }


def empty_report(sources: tuple[str, ...] = ("metadata",)) -> dict:
    return {
        "version": REPORT_VERSION,
        "sources": list(sources),
        "fields": {name: _field() for name in FIELDS},
        "claims": [],
        "measured": None,
        "vlm": None,
        "vlm_prompt": None,
        "disagreements": [],
    }


def _patient_fields(record: LesionRecord, fields: dict) -> None:
    dx = labels.BY_CODE[record.dx].phrase if record.dx in labels.BY_CODE else (record.diagnosis or None)
    fields["diagnosis"] = _field(dx, "metadata")
    fields["age"] = _field(record.age, "metadata")
    fields["sex"] = _field(record.sex if record.sex != "unknown" else None, "metadata")
    fields["site"] = _field(record.site if record.site != "unknown" else None, "metadata")
    fields["elevation"] = _field(record.elevation, "metadata")
    concepts = {name: record.concepts.get(name) for name in labels.CONCEPT_NAMES}
    source = record.concept_source if record.concept_source in SOURCES else None
    fields["patterns"] = {"value": concepts, "source": source if any(concepts.values()) else None, "score": None}
    tone = record.skin_tone if record.skin_tone in labels.SKIN_TONE_NAMES else None
    fields["skin_tone"] = _field(tone, "metadata")


def _merge_claim(report: dict, claim: Claim, measured: Mapping) -> None:
    """State a measured claim unless a stronger source contradicts it; a weaker one is overridden."""
    fields = report["fields"]
    patterns = fields["patterns"]
    concept_source = patterns["source"]
    contradicted = claim.concepts and concept_source and not EXPERT_TARGETS[claim.target](patterns["value"])
    score = measured.get(claim.key)
    if contradicted:
        expert_values = {c: patterns["value"].get(c) for c in claim.concepts}
        report["disagreements"].append(
            _disagreement(claim.field, concept_source, expert_values, "measured", claim.value)
            if PRIORITY[concept_source] < PRIORITY["measured"]
            else _disagreement(claim.field, "measured", claim.value, concept_source, expert_values)
        )
        if PRIORITY[concept_source] < PRIORITY["measured"]:
            return
        for c in claim.concepts:  # the measurement replaces the imputed guess about these concepts
            patterns["value"][c] = None
    fields[claim.field] = _field(claim.value, "measured", score)
    if claim.name in SPOKEN_CLAIMS:
        report["claims"].append(claim.name)


def _measured_fields(report: dict, measured: Mapping) -> None:
    fields = report["fields"]
    report["measured"] = {k: measured.get(k) for k in MEASURED_KEYS}
    if not measured.get("mask_ok"):
        return
    for claim in CLAIMS:
        if claim.holds(measured):
            _merge_claim(report, claim, measured)
    colours = sorted(
        (c for c, f in (measured.get("colors") or {}).items() if f >= 0.1), key=lambda c: -measured["colors"][c]
    )
    fields["colours"] = _field(colours, "measured") if colours else _field()
    fields["size"] = _field(measured["area_pct"], "measured", measured["area_pct"])
    if measured["area_pct"] >= LARGE_AREA_PCT:
        report["claims"].append("large")
    fields["cut_off"] = _field(bool(measured["cut_off"]), "measured")
    if measured["cut_off"]:
        report["claims"].append("cut_off")
    tone = measured.get("skin_tone")
    if tone in labels.SKIN_TONE_NAMES:
        current = fields["skin_tone"]
        if current["value"] is None:
            fields["skin_tone"] = _field(tone, "measured", measured.get("ita"))
        elif current["value"] != tone:
            report["disagreements"].append(
                _disagreement("skin_tone", current["source"], current["value"], "measured", tone)
            )
    report["claims"].sort(key=SPOKEN_CLAIMS.index)


def _vlm_fields(report: dict, vlm: Mapping, prompt: str | None) -> None:
    fields = report["fields"]
    report["vlm"] = {k: (str(vlm[k]) if vlm.get(k) is not None else None) for k in VLM_FIELDS}
    report["vlm_prompt"] = prompt
    for name, key in VLM_ONLY_FIELDS.items():
        if vlm.get(key):
            fields[name] = _field(str(vlm[key]), "vlm")
    tone = str(vlm.get("skin_tone") or "").strip().lower()
    tone = next((t for t in labels.SKIN_TONE_NAMES if tone.startswith(t)), None)
    if tone:
        current = fields["skin_tone"]
        if current["value"] is None:
            fields["skin_tone"] = _field(tone, "vlm")
        elif current["value"] != tone:
            report["disagreements"].append(_disagreement("skin_tone", current["source"], current["value"], "vlm", tone))
    if not fields["colours"]["value"] and vlm.get("lesion_color"):
        fields["colours"] = _field([str(vlm["lesion_color"])], "vlm")
    if fields["patterns"]["source"] == "imputed" and vlm.get("dermoscopic_patterns"):
        # a model that looked at the image beats a draw from the diagnosis' concept frequencies
        report["disagreements"].append(
            _disagreement("patterns", "vlm", vlm["dermoscopic_patterns"], "imputed", "imputed concepts")
        )
        fields["patterns"] = {"value": dict.fromkeys(labels.CONCEPT_NAMES), "source": None, "score": None}
        fields["vlm_patterns"] = _field(str(vlm["dermoscopic_patterns"]), "vlm")


def build_report(
    record: LesionRecord, measured: Mapping | None = None, vlm: Mapping | None = None, vlm_prompt: str | None = None
) -> dict:
    """Merge what is known about one image into a report (see the module docstring for priorities)."""
    sources = ("metadata",) + (("image",) if measured is not None else ()) + (("vlm",) if vlm is not None else ())
    report = empty_report(sources)
    _patient_fields(record, report["fields"])
    if measured is not None:
        _measured_fields(report, measured)
    if vlm is not None:
        _vlm_fields(report, vlm, vlm_prompt)
    return report


def describe(
    record: LesionRecord,
    measured: Mapping | None = None,
    vlm: Mapping | None = None,
    vlm_prompt: str | None = None,
    seed: int = 0,
    fits: Callable[[str], bool] | None = None,
) -> tuple[dict, Caption, str]:
    """(report, condensed caption, long text) for one image: what the caption builder stores per row."""
    report = build_report(record, measured, vlm, vlm_prompt)
    return report, report_caption(record, report, seed, fits), report_long_text(record, report)


@dataclass(kw_only=True)
class ReportOptions:
    """Report flags shared by stages that caption images (``build_captions.py`` inherits them)."""

    reporter: str | None = option(
        None,
        help="report sources, a comma list of metadata,image,vlm "
        "(default: metadata,image for the concept style with --images, otherwise metadata)",
    )
    vlm_base_url: str | None = option(
        None, help="OpenAI-compatible endpoint for the vlm reporter, e.g. http://localhost:8000/v1"
    )
    vlm_model: str | None = option(None, help="vision-language model served at --vlm_base_url")
    vlm_api_key_env: str = option(
        DEFAULT_KEY_ENV, help="environment variable that holds the API key (empty for local servers)"
    )
    vlm_concurrency: int = option(4, help="vlm requests in flight at once")
    vlm_timeout: float = option(60.0, help="seconds before a vlm request is retried")
    vlm_retries: int = option(4, help="retries on 429, 5xx and timeouts, with exponential backoff")
    vlm_cache: str | None = option(
        None, help="JSONL cache of vlm replies (default: OUT/vlm_cache.jsonl); reruns never pay twice"
    )
    analysis_workers: int = option(0, help="processes measuring images with the analyzer (0: one per usable core)")


def resolve_reporters(cfg, style: str, has_images: bool) -> tuple[str, ...]:
    """The report sources a run uses; impossible combinations name the flag to fix."""
    if cfg.reporter is None:
        return ("metadata", "image") if style == "concept" and has_images else ("metadata",)
    sources = parse_reporters(cfg.reporter)
    if sources != ("metadata",) and style != "concept":
        raise InputError(
            "--reporter", f"'{cfg.reporter}' needs --style concept", "drop --reporter or use --style concept"
        )
    if ("image" in sources or "vlm" in sources) and not has_images:
        raise InputError(
            "--reporter", f"'{cfg.reporter}' needs --images", "pass --images DIR or use --reporter metadata"
        )
    if "vlm" in sources and not (cfg.vlm_base_url and cfg.vlm_model):
        raise InputError(
            "--reporter",
            "vlm needs --vlm_base_url and --vlm_model",
            "e.g. --vlm_base_url http://localhost:8000/v1 --vlm_model NAME",
        )
    return sources


def row_report(row: Mapping) -> dict:
    """The report of a ``metadata.jsonl`` / ``captions.jsonl`` row (stored as a JSON string, because
    Hugging Face imagefolder requires every split's metadata to infer one identical schema, which
    optional nested fields cannot promise)."""
    report = row["report"]
    return json.loads(report) if isinstance(report, str) else dict(report)


class Reporter:
    """Adds ``report`` (a JSON string), ``long_text`` and the report caption to caption-builder rows."""

    def __init__(self, sources: tuple[str, ...], cfg: ReportOptions, out: Path, api_key: str | None = None) -> None:
        self.sources, self.client, self.workers = sources, None, analysis_workers(cfg.analysis_workers)
        if "vlm" in sources:
            cache = Path(cfg.vlm_cache) if cfg.vlm_cache else out / "vlm_cache.jsonl"
            self.client = VLMClient(
                cfg.vlm_base_url,
                cfg.vlm_model,
                api_key,
                cache,
                cfg.vlm_timeout,
                cfg.vlm_retries,
                1.0,
                cfg.vlm_concurrency,
            )
            self.client.check()  # before any image is processed

    @classmethod
    def from_config(cls, cfg: ReportOptions, style: str, images: Path | None, out: Path) -> Reporter | None:
        sources = resolve_reporters(cfg, style, images is not None)
        if sources == ("metadata",):
            return None
        return cls(sources, cfg, out, api_key_from_env(cfg.vlm_api_key_env) if "vlm" in sources else None)

    def apply(
        self, items: list[tuple[LesionRecord, Path]], rows: list[dict], seed: int, fits: Callable[[str], bool]
    ) -> dict:
        """Measure (and ask the vlm about) every image, then rewrite each row's caption from its report."""
        measured: list[dict | None] = [None] * len(items)
        if "image" in self.sources:
            measured = measure_files([p for _, p in items], self.workers)
        replies = [None] * len(items)
        if self.client is not None:
            replies = self.client.describe_many([p for _, p in items], [patient_facts(r) for r, _ in items])
        stats = {"sources": list(self.sources), "mask_ok": 0, "claims": {}, "disagreements": {}, "vlm_used": 0}
        for (record, _), row, m, reply in zip(items, rows, measured, replies, strict=True):
            vlm_report = reply.report if reply is not None and reply.status == "ok" else None
            vlm_prompt = reply.prompt if vlm_report is not None else None
            report, cap, long_text = describe(record, m, vlm_report, vlm_prompt, seed, fits)
            row.update(reported_record(record, report).to_row())
            row.update(
                text=cap.text,
                caption_omitted=",".join(cap.omitted),
                n_tokens=count_tokens(cap.text),
                report=json.dumps(report),
                long_text=long_text,
            )
            row["reporter"] = ",".join(self.sources)
            stats["mask_ok"] += bool(m and m["mask_ok"])
            stats["vlm_used"] += vlm_report is not None
            for c in report["claims"]:
                stats["claims"][c] = stats["claims"].get(c, 0) + 1
            for d in report["disagreements"]:
                k = f"{d['field']}: {d['kept']} over {d['dropped']}"
                stats["disagreements"][k] = stats["disagreements"].get(k, 0) + 1
        if self.client is not None:
            stats["vlm"] = self.client.summary()
        print_report_stats(stats, len(rows))
        return stats


def patient_facts(record: LesionRecord) -> str:
    parts = [f"age {int(record.age)}" if record.age is not None else "", record.sex if record.sex != "unknown" else ""]
    parts.append(f"site {record.site}" if record.site != "unknown" else "")
    return ", ".join(p for p in parts if p)


def print_report_stats(stats: dict, n: int) -> None:
    print(
        f"reports ({'+'.join(stats['sources'])}): {stats['mask_ok']}/{n} images measured; claims {stats['claims'] or 'none'}"
    )
    if stats["disagreements"]:
        print(f"disagreements (kept the stronger source): {stats['disagreements']}")
    if "vlm" in stats:
        v = stats["vlm"]
        print(
            f"vlm {v['model']}: {v['statuses']} ({stats['vlm_used']} used); {v['requests']} requests, {v['retries']} retries, "
            f"{v['cache_hits']} from cache; tokens: {v['prompt_tokens']} prompt + {v['completion_tokens']} completion"
        )
