"""``LesionRecord`` -> caption text. The only code that writes caption text; pure, no torch.

Facts are ordered by importance (diagnosis, present concepts, demographics, elevation, skin tone,
confirmation, absent concepts) so that shortening for CLIP's window drops only the tail, never the
diagnosis or a present concept. Phrasing varies with a per-image seeded RNG, so the same record and
seed always give the same caption, independently of row order.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from . import labels
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
    """(name, phrase) facts, most important first; the first two are never omitted."""
    present, absent = concept_phrases(record.concepts)
    rng.shuffle(present)
    facts = [("diagnosis", rng.choice(OPENERS).format(dx=dx_phrase(record)))]
    facts.append(("concepts", f"{rng.choice(WITH)} {_join(present)}" if present else ""))
    facts.append(("demographics", demographics_phrase(record, rng)))
    facts.append(("elevation", f"{record.elevation} lesion" if record.elevation else ""))
    facts.append(("skin_tone", f"{record.skin_tone} skin" if record.skin_tone not in ("unknown", "") else ""))
    facts.append(("dx_type", labels.DX_TYPES.get(record.dx_type or "", "")))
    facts.append(("absent_concepts", ", ".join(absent)))
    return [(name, text) for name, text in facts if text]


def concept_caption(record: LesionRecord, rng: random.Random, fits: Callable[[str], bool] | None = None) -> Caption:
    """Concept-rich caption; with ``fits`` given, tail facts are dropped (and recorded) until it fits."""
    facts = _concept_facts(record, rng)
    keep = len(facts)
    while True:
        text = ", ".join(t for _, t in facts[:keep])
        if fits is None or fits(text):
            return Caption(text, tuple(n for n, _ in facts[keep:]))
        if keep <= 2:
            raise ValueError(
                f"caption for {record.image_id} exceeds the token window even without optional facts: '{text}'"
            )
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
