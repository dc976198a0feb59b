"""``LesionRecord`` -> caption text. The only code that writes caption text; pure, no torch.

Facts are ordered by importance (diagnosis, present concepts, demographics, elevation, skin tone,
confirmation, absent concepts) so that shortening for CLIP's window drops only the tail, never the
diagnosis or a present concept. Phrasing varies with a per-image seeded RNG, so the same record and
seed always give the same caption, independently of row order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from .. import labels
from .metadata import LesionRecord

OPENERS = (
    "a dermoscopic image of {dx}",
    "dermoscopy of {dx}",
    "a dermatoscopic photograph of {dx}",
    "{dx}, dermoscopic image",
)
WITH = ("with", "showing", "featuring")
SEX_WORDS = {"male": ("male", "man"), "female": ("female", "woman")}


@dataclass(frozen=True)
class Caption:
    text: str
    omitted: tuple[str, ...]  # facts left out to fit the token window, recorded, never silent


def record_rng(seed: int, image_id: str) -> random.Random:
    """Per-image RNG: the phrasing of one image does not depend on which others are captioned."""
    return random.Random(f"{seed}:{image_id}")


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def dx_phrase(record: LesionRecord) -> str:
    if record.dx in labels.BY_CODE:
        return labels.BY_CODE[record.dx].phrase
    return record.diagnosis or "skin lesion"


def concept_phrases(concepts: dict[str, str]) -> tuple[list[str], list[str]]:
    """(present phrases, absent phrases) in checklist order."""
    present, absent = [], []
    for concept in labels.CONCEPTS:
        value = concepts.get(concept.name)
        if value is None:
            continue
        if value == "absent":
            absent.append(concept.absent_phrase)
        else:
            present.append(concept.phrases[value])
    return present, absent


def _present(record: LesionRecord, name: str) -> bool:
    return record.concepts.get(name) not in (None, "absent")


def demographics_phrase(record: LesionRecord, rng: random.Random) -> str:
    age = f"{int(record.age)}-year-old" if record.age is not None else ""
    article = "an" if age[:1] == "8" or age[:2] in ("11", "18") else "a"
    sex = rng.choice(SEX_WORDS[record.sex]) if record.sex in SEX_WORDS else ""
    site = record.site if record.site != "unknown" else ""
    who = " ".join(w for w in (age, sex) if w)
    style = rng.randrange(2)
    if style == 0:
        parts = []
        if site:
            parts.append(f"on the {site}")
        if who:
            parts.append(f"of {article} {who}" if sex else f"in {article} {who} patient")
        return " ".join(parts)
    parts = [p for p in (site, sex, f"age {int(record.age)}" if record.age is not None else "") if p]
    return ", ".join(parts)


def label_caption(record: LesionRecord, rng: random.Random | None = None) -> Caption:
    """The paper's label-only baseline."""
    return Caption(f"a dermoscopic image of {dx_phrase(record)}", ())


def _concept_facts(record: LesionRecord, rng: random.Random) -> list[tuple[str, str]]:
    """(name, phrase) facts, most important first; the first two are never omitted.

    Every random choice is drawn in a fixed order whatever the concepts are, and present concepts are
    ordered by a key drawn per concept name, so switching one concept changes that concept's phrase and
    nothing else: the two prompts of a ``generate.py --contrast`` pair differ in exactly one fact.
    """
    opener, joiner, order = rng.choice(OPENERS), rng.choice(WITH), rng.random()
    demographics = demographics_phrase(record, rng)
    named = [(c.name, c.phrases[record.concepts[c.name]]) for c in labels.CONCEPTS if _present(record, c.name)]
    named.sort(key=lambda item: random.Random(f"{order}:{item[0]}").random())
    present = [phrase for _, phrase in named]
    _, absent = concept_phrases(record.concepts)
    facts = [("diagnosis", opener.format(dx=dx_phrase(record)))]
    facts.append(("concepts", f"{joiner} {_join(present)}" if present else ""))
    facts.append(("demographics", demographics))
    facts.append(("elevation", f"{record.elevation} lesion" if record.elevation else ""))
    facts.append(("skin_tone", f"{record.skin_tone} skin" if record.skin_tone not in ("unknown", "") else ""))
    facts.append(("dx_type", labels.DX_TYPES.get(record.dx_type or "", "")))
    facts.append(("absent_concepts", ", ".join(absent)))
    return [(name, text) for name, text in facts if text]


def concept_caption(record: LesionRecord, rng: random.Random, fits: Callable[[str], bool] | None = None) -> Caption:
    """Concept-rich caption; with ``fits`` given, tail facts are dropped (and recorded) until it fits."""
    return _fit(_concept_facts(record, rng), fits, record.image_id)


def _fit(facts: list[tuple[str, str]], fits: Callable[[str], bool] | None, image_id: str) -> Caption:
    """Join facts, dropping (and recording) tail facts until ``fits``; the first two always stay."""
    keep = len(facts)
    while True:
        text = ", ".join(t for _, t in facts[:keep])
        if fits is None or fits(text):
            return Caption(text, tuple(n for n, _ in facts[keep:]))
        if keep <= 2:
            raise ValueError(f"caption for {image_id} exceeds the token window even without optional facts: '{text}'")
        keep -= 1


STYLES: dict[str, Callable[..., Caption]] = {"label": label_caption, "concept": concept_caption}


def caption(
    record: LesionRecord, style: str = "concept", seed: int = 0, fits: Callable[[str], bool] | None = None
) -> Caption:
    """Caption one record in a named style; the RNG is derived from ``seed`` and the image id."""
    if style not in STYLES:
        raise KeyError(f"unknown caption style '{style}'; valid: {', '.join(STYLES)}")
    rng = record_rng(seed, record.image_id)
    if style == "label":
        return label_caption(record, rng)
    return concept_caption(record, rng, fits)


# Report captions (issue 9): the concept caption of the merged report plus the analyzer's calibrated,
# hedged claims (reports.CLAIMS), and a long prose report for T5-class text encoders.
MEASURED_PHRASES: dict[str, str] = {
    "blue_gray": "blue-gray areas",
    "variegated": "variegated pigmentation",
    "uniform": "uniform colour",
    "color_asymmetry": "asymmetric colour distribution",
    "large": "lesion fills most of the frame",
    "cut_off": "extends beyond the field of view",
}
COLOUR_WORDS = {"blue_gray": "blue-gray"}
MAX_VLM_WORDS = 12  # a model's free-text field is cut here so it cannot crowd out the facts


def _words(text: str, limit: int = MAX_VLM_WORDS) -> str:
    return " ".join(str(text).split()[:limit]).strip(" ,.;")


def reported_record(record: LesionRecord, report: dict) -> LesionRecord:
    """The record as the merged report sees it: its concepts and skin tone replace the metadata's."""
    fields = report["fields"]
    concepts = {k: v for k, v in fields["patterns"]["value"].items() if v is not None}
    source = fields["patterns"]["source"] or "none"
    tone = fields["skin_tone"]["value"] or "unknown"
    return replace(record, concepts=concepts, concept_source=source, skin_tone=tone)


def report_caption(
    record: LesionRecord, report: dict, seed: int = 0, fits: Callable[[str], bool] | None = None
) -> Caption:
    """Condensed prompt of a report: the concept caption's facts with the measured claims right after
    the checklist concepts, then vlm-only descriptions; the tail is dropped to fit, never the diagnosis."""
    rng = record_rng(seed, record.image_id)
    facts = _concept_facts(reported_record(record, report), rng)
    fields = report["fields"]
    at = 2 if len(facts) > 1 and facts[1][0] == "concepts" else 1
    if (fields.get("vlm_patterns") or {}).get("value"):
        facts.insert(at, ("concepts", f"{rng.choice(WITH)} {_words(fields['vlm_patterns']['value'])}"))
        at += 1
    claims = [MEASURED_PHRASES[c] for c in report["claims"] if c in MEASURED_PHRASES]
    if claims:
        facts.insert(at, ("measured", ", ".join(claims)))
        at += 1
    described = []
    for name in ("border", "shape", "texture"):
        value = (fields.get(name) or {}).get("value")
        if value:
            value = _words(value, 6)
            described.append(value if name in value.lower() else f"{value} {name}")
    if described:
        facts.insert(at, ("vlm", ", ".join(described)))
    return _fit(facts, fits, record.image_id)


def report_long_text(record: LesionRecord, report: dict) -> str:
    """The whole report in prose (no token limit), each statement saying where it came from."""
    f = report["fields"]
    rec = reported_record(record, report)
    confirmed = f" ({labels.DX_TYPES[record.dx_type]})" if record.dx_type in labels.DX_TYPES else ""
    sentences = [f"Dermoscopic image of {dx_phrase(record)}{confirmed}."]
    who = " ".join(
        w for w in (f"{int(record.age)}-year-old" if record.age is not None else "", record.sex) if w and w != "unknown"
    )
    where = f" on the {record.site}" if record.site != "unknown" else ""
    if who or where:
        article = "an" if who[:1] == "8" or who[:2] in ("11", "18") else "a"
        sentences.append(f"Lesion{where}" + (f" of {article} {who} patient." if who else "."))
    if record.elevation:
        sentences.append(f"Elevation: {record.elevation}.")
    present, absent = concept_phrases(rec.concepts)
    if present or absent:
        parts = [f"present: {_join(present)}" if present else "", ", ".join(absent)]
        sentences.append(
            f"Dermoscopic structures ({f['patterns']['source']}): " + "; ".join(p for p in parts if p) + "."
        )
    if (f.get("vlm_patterns") or {}).get("value"):
        sentences.append(f"Dermoscopic patterns (vision-language model): {f['vlm_patterns']['value']}.")
    m = report.get("measured") or {}
    if m.get("mask_ok"):
        edge = "extends beyond the field of view" if m["cut_off"] else "lies within the field of view"
        sentences.append(f"The lesion covers {m['area_pct']:.0f}% of the image and {edge} (measured).")
        colours = sorted(((c, x) for c, x in m["colors"].items() if x >= 0.05), key=lambda t: -t[1])
        if colours:
            shares = ", ".join(f"{COLOUR_WORDS.get(c, c.replace('_', ' '))} {x * 100:.0f}%" for c, x in colours)
            sentences.append(f"Colours (measured share of the lesion): {shares}.")
        said = [MEASURED_PHRASES[c] for c in report["claims"] if c not in ("large", "cut_off")]
        if said:
            sentences.append("Measured: " + ", ".join(said) + ".")
    elif report.get("measured") is not None:
        sentences.append("The image could not be measured, so no measured attributes are stated.")
    tone = f["skin_tone"]
    if tone["value"]:
        ita = f", ITA {tone['score']:.0f} degrees" if tone["source"] == "measured" and tone["score"] is not None else ""
        sentences.append(f"Surrounding skin: {tone['value']} ({tone['source']}{ita}).")
    for name in ("border", "shape", "shape_variability", "texture", "other"):
        value = (f.get(name) or {}).get("value")
        if value:
            sentences.append(f"{name.replace('_', ' ').capitalize()} (vision-language model): {value}.")
    return " ".join(sentences)
