"""Diagnosis-conditional concept frequencies measured on Derm7pt, and imputation from them.

HAM10000 has no concept annotations, so its captions carry a concept-guided pseudo-report: each
checklist concept is drawn from P(value | diagnosis) as counted on Derm7pt. The table ships as
``resources/concept_frequencies.csv`` and is regenerated with
``python -m lesiongen.captions.concepts --d7p_metadata data/d7p/meta.csv``.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd

from .. import labels
from ..cli import option, parse_config, run
from ..errors import InputError
from ..files import write_text
from .metadata import LesionRecord, load_d7p

TABLE_PATH = Path(__file__).parent / "resources" / "concept_frequencies.csv"

# Derm7pt has no actinic keratosis; its concepts are drawn from the pooled keratinocytic and other
# non-melanocytic classes, the closest dermoscopic relatives it has (documented in DATASET_INFO.md).
POOLED_FALLBACK: dict[str, tuple[str, ...]] = {"akiec": ("bcc", "bkl")}


def count_concepts(records: list[LesionRecord]) -> pd.DataFrame:
    """Rows (dx, concept, value, count, frequency, support) for every allowed value, zeros included."""
    by_dx: dict[str, list[LesionRecord]] = {}
    for r in records:
        if r.concept_source == "expert" and r.dx in labels.BY_CODE:
            by_dx.setdefault(r.dx, []).append(r)
    for dx, sources in POOLED_FALLBACK.items():
        if not by_dx.get(dx):
            by_dx[dx] = [r for s in sources for r in by_dx.get(s, [])]
    rows = []
    for dx in labels.CODES:
        recs = by_dx.get(dx, [])
        for concept in labels.CONCEPTS:
            counts = Counter(r.concepts[concept.name] for r in recs)
            for value in concept.values:
                n = counts.get(value, 0)
                rows.append(
                    {
                        "dx": dx,
                        "concept": concept.name,
                        "value": value,
                        "count": n,
                        "frequency": round(n / len(recs), 6) if recs else 0.0,
                        "support": len(recs),
                        "pooled_from": "+".join(POOLED_FALLBACK[dx]) if dx in POOLED_FALLBACK else "",
                    }
                )
    return pd.DataFrame(rows)


@lru_cache(maxsize=4)
def load_table(path: str = str(TABLE_PATH)) -> dict[str, dict[str, tuple[tuple[str, ...], tuple[float, ...]]]]:
    """dx -> concept -> (values, weights), read once per process."""
    df = pd.read_csv(path, dtype={"value": str}, keep_default_na=False)
    table: dict[str, dict[str, tuple[tuple[str, ...], tuple[float, ...]]]] = {}
    for (dx, concept), g in df.groupby(["dx", "concept"], sort=False):
        table.setdefault(dx, {})[concept] = (tuple(g["value"]), tuple(float(c) for c in g["count"]))
    return table


def impute_concepts(dx: str, rng: random.Random) -> dict[str, str]:
    """Draw one plausible checklist profile for a diagnosis; empty for classes with no support."""
    table = load_table()
    if dx not in table:
        return {}
    drawn = {}
    for concept in labels.CONCEPT_NAMES:
        values, weights = table[dx][concept]
        if sum(weights) == 0:
            return {}
        drawn[concept] = rng.choices(values, weights=weights, k=1)[0]
    return drawn


@dataclass
class ConceptTableConfig:
    d7p_metadata: str = option("data/d7p/meta/meta.csv", "Derm7pt meta.csv to count concepts from")
    output: str = option(str(TABLE_PATH), "where to write the frequency table CSV", aliases=("--out",))


def write_table(cfg: ConceptTableConfig) -> pd.DataFrame:
    records = load_d7p(cfg.d7p_metadata).records
    table = count_concepts(records)
    if table["support"].max() == 0:
        raise InputError(cfg.d7p_metadata, "no expert concept annotations found", "pass Derm7pt's meta.csv")
    write_text(cfg.output, table.to_csv(index=False))
    load_table.cache_clear()
    print(f"wrote {cfg.output}: {len(table)} rows from {len(records)} Derm7pt cases")
    return table


def main(argv: list[str] | None = None) -> int:
    return run(
        lambda: write_table(parse_config(ConceptTableConfig, argv, prog="python -m lesiongen.captions.concepts"))
    )


if __name__ == "__main__":
    sys.exit(main())
