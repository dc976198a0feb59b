"""Targeted generation (``generate.py --target METRICS``): a classifier's validation results -> class and subgroup
weights that aim a dataset run at what the classifier gets wrong. Pure, no torch.

``METRICS`` is the ``metrics.json`` that ``classification/eval.py`` writes: ``overall.per_class[code].recall`` and
``subgroups[field].groups[group]`` with its ``accuracy``, ``n`` and ``ranked`` (false for 'unknown' and for groups
under eval.py's ``--min_group_size``). The weights are

    class c:            w_c ∝ (1 - recall_c) + FLOOR,    over the --condition classes, normalised to sum 1
    group g of FIELD:   w_g ∝ (1 - accuracy_g) + FLOOR,  over FIELD's groups a prompt can state, normalised

with FLOOR = 0.05, so a class or group the classifier gets all right still gets a few images. A class without a
recall (missing from the metrics, or with no validation images) and a group that is not ranked get the mean weight
of the others: nothing says they are weak or strong, so they are not targeted. The class weights split
``--total_images`` as ``--class_weights`` do (``plans.class_mix``); the group weights are a one-field
``plans.Distribution`` that ``plans.build_plan`` spreads each class's images over, as ``--distribution`` is.
FIELD is ``--target_field``, else the field whose worst ranked group has the lowest accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, not_utf8
from .plans import BALANCE_ALIASES, BALANCE_VALUES, Distribution

FLOOR = 0.05
EXPECTED = (
    "a metrics.json from classification/eval.py (overall.per_class with each class's recall, subgroups per field)"
)


@dataclass(frozen=True)
class Target:
    """Weights read from one metrics file: per dx code and, for ``field``, per group (normalised, each sums to 1)."""

    source: str
    classes: dict[str, float]
    field: str | None = None
    groups: dict[str, float] | None = None
    untargeted: tuple[str, ...] = ()  # groups given the mean weight: not ranked in the metrics

    def distribution(self) -> Distribution | None:
        """The group weights as a one-field distribution for every class, or None without a field."""
        if self.field is None or self.groups is None:
            return None
        cells = tuple((None, ((self.field, g),), w) for g, w in self.groups.items())
        return Distribution(f"--target {self.source}", cells, (self.field,))

    def describe(self) -> list[str]:
        """The formula and the weights it gave, for the plan summary a run prints before it starts."""
        weights = ", ".join(f"{c} {w:.2f}" for c, w in self.classes.items())
        lines = [f"  target (from {self.source}): weight = (1 - recall) + {FLOOR:g}, normalised: {weights}"]
        if self.field is None or self.groups is None:
            lines.append(
                "  target subgroups: none (no field that the prompts state and the run leaves free has two ranked groups)"
            )
            return lines
        groups = ", ".join(
            f"{g} {w:.2f}" + (" (not ranked: mean)" if g in self.untargeted else "") for g, w in self.groups.items()
        )
        lines.append(
            f"  target {self.field} within each class: weight = (1 - accuracy) + {FLOOR:g}, normalised: {groups}"
        )
        return lines


def read_metrics(path: str | Path) -> dict:
    """The metrics file's contents, checked to be what eval.py writes; anything else is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "not found", f"pass --target {EXPECTED}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"is not JSON ({e.msg} at line {e.lineno})", f"pass --target {EXPECTED}") from None
    overall = data.get("overall") if isinstance(data, dict) else None
    per_class = overall.get("per_class") if isinstance(overall, dict) else None
    subgroups = data.get("subgroups") if isinstance(data, dict) else None
    if not (
        isinstance(per_class, dict)
        and all(isinstance(v, dict) and "recall" in v for v in per_class.values())
        and isinstance(subgroups, dict)
        and all(
            isinstance(v, dict) and isinstance(v.get("groups"), dict) and _all_dicts(v["groups"].values())
            for v in subgroups.values()
        )
    ):
        raise InputError(path, "is not a classifier's metrics.json", f"pass --target {EXPECTED}")
    return data


def resolve_field(name: str) -> str:
    """A --target_field name (or an alias as --balance takes) -> a subgroup field prompts can state."""
    field = BALANCE_ALIASES.get(name.lower(), name.lower())
    if field not in BALANCE_VALUES:
        valid = ", ".join([*BALANCE_VALUES, *BALANCE_ALIASES])
        raise InputError("--target_field", f"'{name}' is not a subgroup field", f"choose from {valid}")
    return field


def weights(scores: Mapping[str, float | None]) -> tuple[dict[str, float], tuple[str, ...]]:
    """(1 - score) + FLOOR per key, a missing score (None) taking the mean of the others, normalised to sum 1;
    also the keys that took the mean."""
    known = {k: (1.0 - s) + FLOOR for k, s in scores.items() if s is not None}
    mean = sum(known.values()) / len(known)
    raw = {k: known.get(k, mean) for k in scores}
    total = sum(raw.values())
    return {k: w / total for k, w in raw.items()}, tuple(k for k in scores if k not in known)


def class_weights(metrics: dict, codes: Sequence[str], source: str) -> dict[str, float]:
    per_class = metrics["overall"]["per_class"]
    recall = {c: _score(per_class.get(c, {}).get("recall"), source) for c in codes}
    if all(r is None for r in recall.values()):
        raise InputError(source, f"has no recall for {', '.join(codes)}", "score the classifier on images of them")
    return weights(recall)[0]


def ranked_accuracy(metrics: dict, field: str, source: str) -> dict[str, float | None]:
    """Accuracy of each group of ``field`` a prompt can state; None where the metrics do not rank the group."""
    groups = metrics["subgroups"].get(field, {}).get("groups", {})
    return {
        g: _score(groups[g].get("accuracy"), source) if groups.get(g, {}).get("ranked") else None
        for g in BALANCE_VALUES[field]
    }


def worst_field(metrics: dict, fields: Sequence[str], source: str) -> str | None:
    """Of ``fields``, the one whose worst ranked group scores lowest (at least two ranked groups), or None."""
    worst = []
    for f in fields:
        ranked = [a for a in ranked_accuracy(metrics, f, source).values() if a is not None]
        if len(ranked) >= 2:
            worst.append((min(ranked), list(BALANCE_VALUES).index(f), f))
    return min(worst)[2] if worst else None


def read_target(path: str | Path, codes: Sequence[str], field: str | None, free: Sequence[str]) -> Target:
    """The target of ``path`` for ``codes``: on ``field`` if named, else on the worst of the ``free`` fields (those a
    run neither fixes nor balances)."""
    metrics = read_metrics(path)
    source = str(path)
    classes = class_weights(metrics, codes, source)
    chosen = resolve_field(field) if field else worst_field(metrics, free, source)
    if chosen is None:
        return Target(source, classes)
    accuracy = ranked_accuracy(metrics, chosen, source)
    if sum(a is not None for a in accuracy.values()) < 2:
        raise InputError(
            "--target_field", f"{path} ranks fewer than two {chosen} groups", "choose another field or leave it out"
        )
    groups, untargeted = weights(accuracy)
    return Target(source, classes, chosen, groups, untargeted)


def _score(value: object, source: str) -> float | None:
    """A recall or accuracy from the file: None, or a number in 0..1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:  # nan fails too
        raise InputError(source, f"holds a recall or accuracy of {value!r}", f"pass --target {EXPECTED}")
    return float(value)


def _all_dicts(values: object) -> bool:
    return all(isinstance(v, dict) for v in values)
