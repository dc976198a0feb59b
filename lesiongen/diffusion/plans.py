"""Generation plans: condition(s) + subgroup targets -> a seeded list of ``ImageSpec``. Pure, no torch.

A plan is a pure function of its arguments, so a rerun after a kill, or every process of a multi-GPU
run, rebuilds exactly the same list and agrees on which image is which. Counts are exact: images are
spread over subgroup cells by the largest-remainder rule, never sampled, so ``--num_images 100
--balance skin_tone`` gives 17 or 16 per tone, summing to 100.

Every per-image draw (age within its bin, site within its group, imputed concepts, guidance, steps)
comes from its own RNG derived from the image's seed, so changing one list (say, the guidance values)
does not reshuffle the others.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import labels
from ..captions.concepts import impute_concepts
from ..captions.metadata import LesionRecord
from ..errors import InputError, not_utf8

# The original LesionGen draws each image's guidance and step count from these lists (generate.py --original_grid).
ORIGINAL_GUIDANCE_SCALES: tuple[float, ...] = (3.0, 5.0, 7.5, 10.0)
ORIGINAL_STEPS: tuple[int, ...] = (30, 50, 70, 100)
# The default: docs/results.md's quality-matched fast setting. With DPM-Solver++ at guidance 3, 10 steps matched the
# original sampler at 50 steps on FID and recognisability (benchmarks/bench_sampler_quality.py, 2026-12-06) at a
# sixth of the grid's mean 62.5 steps per image; lower guidance also covered more of each condition there.
FAST_GUIDANCE_SCALES: tuple[float, ...] = (3.0,)
FAST_STEPS: tuple[int, ...] = (10,)

# A run holds its whole plan in memory (a resume and every process rebuild it), so its size is checked before it is
# built. Measured 2026-12-07 on this project's 2-core CPU, build_plan of 20,000 images: about 830 bytes (tracemalloc)
# and 70 microseconds per image; a run also holds each image's file name and manifest row, hence 1 KB.
PLAN_BYTES_PER_IMAGE = 1_000
PLAN_SECONDS_PER_IMAGE = 70e-6
# docs/results.md's GPU check: SD-1.x at 512 px, DPM-Solver++ 25 steps, batch 16, on an H200: 6.04 images/s.
TYPICAL_IMAGES_PER_SECOND = 6.0
# A million images is about 1 GB and a minute to plan, and two days of that GPU; more is several runs.
MAX_PLAN_IMAGES = 1_000_000

# Values a plan can balance over; "unknown" is left out because a caption cannot state it.
BALANCE_VALUES: dict[str, tuple[str, ...]] = {
    "sex": tuple(s for s in labels.SEXES if s != "unknown"),
    "age_bin": labels.AGE_BIN_NAMES,
    "site_group": tuple(g for g in labels.SITE_GROUP_NAMES if g != "unknown"),
    "skin_tone": labels.SKIN_TONE_NAMES,
}
BALANCE_ALIASES: dict[str, str] = {"age": "age_bin", "site": "site_group", "body_site": "site_group"}

# Columns a distribution CSV may carry (metadata.jsonl, a manifest and HAM10000's CSV all qualify).
DX_COLUMNS = ("dx", "label", "condition")
WEIGHT_COLUMNS = ("weight", "count", "n", "fraction")
SUBGROUP_COLUMNS = ("sex", "age_bin", "age", "site_group", "site", "localization", "skin_tone")

Cell = tuple[tuple[str, str], ...]  # sorted (field, value) pairs, hashable


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to generate one image and describe it in the manifest."""

    dx: str
    index: int  # number of the image within its condition
    image_id: str  # names the file and seeds the caption phrasing
    seed: int
    guidance_scale: float
    num_inference_steps: int
    sex: str = "unknown"
    age: float | None = None
    site: str = "unknown"
    skin_tone: str = "unknown"
    concepts: tuple[tuple[str, str], ...] = ()
    concept_source: str = "none"
    contrast: str = ""  # for a --contrast pair, 'field=on:off'; both images share image_id and seed
    variant: str = ""  # which side of the pair this image is (the switched value)
    source: str = ""  # image-to-image (sources.py): the real image it starts from, its absolute path
    text: str = ""  # a fixed prompt (an edited image's own caption); empty: captioned from the record

    @property
    def stem(self) -> str:
        """The image's file stem: a pair's two images share ``image_id`` and differ in their variant. The
        switched field is part of it, because two switches of one image have equal variants ('absent') whose
        prompts differ; without it they shared one file, and each pair was measured against another's image."""
        if not self.contrast:
            return self.image_id
        field = self.contrast.partition("=")[0]
        return f"{self.image_id}_{field}-{self.variant.replace(' ', '-')}"

    @property
    def condition(self) -> str:
        return labels.BY_CODE[self.dx].name

    @property
    def age_bin(self) -> str:
        return labels.age_bin(self.age)

    @property
    def site_group(self) -> str:
        return labels.site_group(self.site)

    def record(self) -> LesionRecord:
        """The record the caption builder would see for a real image with these facts."""
        return LesionRecord(
            image_id=self.image_id,
            lesion_id=self.image_id,
            dataset="synthetic",
            dx=self.dx,
            diagnosis=labels.BY_CODE[self.dx].phrase,
            age=self.age,
            sex=self.sex,
            site=self.site,
            skin_tone=self.skin_tone,
            concepts=dict(self.concepts),
            concept_source=self.concept_source,
        )


@dataclass(frozen=True)
class Distribution:
    """Weighted subgroup cells read from a CSV, optionally per dx code."""

    source: str
    cells: tuple[tuple[str | None, Cell, float], ...]  # (dx or None for every condition, cell, weight)
    columns: tuple[str, ...] = field(default=())


def image_seed(seed: int, dx: str, index: int) -> int:
    """A stable 31-bit seed per image: the same image gets the same seed however the plan is cut."""
    digest = hashlib.sha256(f"{seed}:{dx}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def allocate(n: int, weights: Sequence[float], rng: random.Random) -> list[int]:
    """Split ``n`` into integer counts proportional to ``weights`` (largest remainder; seeded tie-break)."""
    total = float(sum(weights))
    if n < 0 or total <= 0 or any(w < 0 for w in weights):
        raise ValueError("allocate needs n >= 0 and non-negative weights with a positive sum")
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    tie = list(range(len(weights)))
    rng.shuffle(tie)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), tie[i]))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


Walk = list[tuple[int, ...]]  # joint cells as value indices per field, in visiting order


def diagonal_walk(sizes: Sequence[int], rng: random.Random, first: tuple[int, ...] | None = None) -> Walk:
    """Every joint cell of fields with ``sizes`` values once, along the diagonal (+1 on every field at each step),
    which visits each field's values in turn; a finished cycle restarts from an unvisited cell (seeded). ``first``,
    if given, is where it begins."""
    starts = list(itertools.product(*(range(s) for s in sizes)))
    rng.shuffle(starts)
    if first is not None:
        starts.insert(0, first)
    walk: Walk = []
    seen: set[tuple[int, ...]] = set()
    for cell in starts:
        while cell not in seen:
            seen.add(cell)
            walk.append(cell)
            cell = tuple((x + 1) % size for x, size in zip(cell, sizes, strict=True))
    return walk


def allocate_balanced(n: int, sizes: Sequence[int], walk: Walk) -> list[int]:
    """Equal counts over the joint cells of fields with ``sizes`` values (row-major cell order), with
    every field's own counts also within one of each other (12 images over sex x age bin: 6 and 6).

    The leftover images take the first cells of ``walk`` (``diagonal_walk``), so any number of them
    is spread evenly over each field, not only over the joint cells.
    """
    k = math.prod(sizes)
    counts = [n // k] * k
    strides = [math.prod(sizes[j + 1 :]) for j in range(len(sizes))]
    for cell in walk[: n - sum(counts)]:
        counts[sum(x * st for x, st in zip(cell, strides, strict=True))] += 1
    return counts


def interleave(cells: Sequence[Cell], counts: Sequence[int], rng: random.Random) -> list[Cell]:
    """Order the images so that every prefix is spread over the cells in proportion to their counts.

    Each cell's k images sit at evenly spaced positions (j + offset) / k with a seeded offset; a run
    stopped early therefore still holds a balanced set rather than the first cells only.
    """
    slots = []
    for c, (cell, k) in enumerate(zip(cells, counts, strict=True)):
        offset = rng.random()
        slots += [((j + offset) / k, c, cell) for j in range(k)]
    return [cell for _, _, cell in sorted(slots)]


def resolve_codes(condition: str) -> tuple[str, ...]:
    """'all', a display name or a dx code (any case) -> dx codes; an unknown name lists the valid ones."""
    if condition.strip().lower() == "all":
        return labels.CODES
    codes = []
    for part in condition.split(","):
        try:
            codes.append(labels.condition(part).code)
        except KeyError as e:
            raise InputError("--condition", str(e).strip("\"'"), "or pass 'all'") from None
    return tuple(dict.fromkeys(codes))


def parse_class_weights(items: Sequence[str]) -> dict[str, float]:
    """``code=weight`` pairs, joined by commas or given as separate words (``nv=0.4,mel=0.15``), -> weights per dx
    code in labels' order, normalised to sum 1. A display name works as a code does, as in --condition."""
    raw: dict[str, float] = {}
    for item in (part.strip() for word in items for part in word.split(",")):
        if not item:
            continue
        name, sep, text = item.partition("=")
        try:
            code = labels.condition(name).code
        except KeyError:
            raise InputError(
                "--class_weights", f"'{name.strip()}' is not a dx code", f"use {', '.join(labels.CODES)}"
            ) from None
        try:
            weight = float(text) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not 0 <= weight < float("inf"):  # also false for nan
            raise InputError(
                "--class_weights", f"'{item}' is not code=weight with a weight of 0 or more", "e.g. nv=0.4,mel=0.15"
            )
        if code in raw:
            raise InputError("--class_weights", f"names {code} twice", "give each class once")
        raw[code] = weight
    total = sum(raw.values())
    if total <= 0:
        raise InputError("--class_weights", "gives no class a positive weight", "e.g. nv=0.4,mel=0.15,bcc=0.45")
    return {c: raw[c] / total for c in labels.CODES if c in raw}


def class_counts(total: int, weights: dict[str, float], seed: int) -> dict[str, int]:
    """``total`` images split over the classes by the largest-remainder rule (seeded tie-break), so the counts sum
    to ``total`` exactly; a class whose share rounds to nothing is left out."""
    codes = [c for c in labels.CODES if weights.get(c, 0) > 0]
    counts = allocate(total, [weights[c] for c in codes], random.Random(f"classes:{seed}"))
    return {c: n for c, n in zip(codes, counts, strict=True) if n}


def class_mix(
    codes: Sequence[str],
    total: int,
    seed: int,
    weights: dict[str, float] | None = None,
    distribution: Distribution | None = None,
) -> dict[str, int]:
    """Images per dx code for a ``--total_images`` run: by ``--class_weights``, else by the ``--distribution`` file's
    weight per diagnosis (its dx column), else equal over ``codes``."""
    if weights:
        outside = [c for c in weights if c not in codes]
        if outside:
            raise InputError(
                "--class_weights",
                f"weights {', '.join(outside)}, which --condition leaves out ({', '.join(codes)})",
                "add them to --condition or pass --condition all",
            )
    elif distribution is not None and any(dx is not None for dx, _, _ in distribution.cells):
        weights = {}
        for dx, _, w in distribution.cells:
            if dx in codes:
                weights[dx] = weights.get(dx, 0.0) + w
        if not weights:
            raise InputError(
                distribution.source, f"has no rows for {', '.join(codes)}", "add rows for them or pass --class_weights"
            )
    else:
        weights = dict.fromkeys(codes, 1.0)
    return class_counts(total, weights, seed)


def check_plan_size(images: int, where: str) -> None:
    """Refuse, before building it, a plan too large to hold: saying how large, how long, and what to do instead."""
    if images <= MAX_PLAN_IMAGES:
        return
    raise InputError(
        where,
        f"plans {images:,} images, which need about {images * PLAN_BYTES_PER_IMAGE / 1e9:.0f} GB of memory and "
        f"{duration(images * PLAN_SECONDS_PER_IMAGE)} to plan, then about {duration(images / TYPICAL_IMAGES_PER_SECOND)}"
        f" to generate at {TYPICAL_IMAGES_PER_SECOND:g} images/s (an H200 at 512 px)",
        f"ask for at most {MAX_PLAN_IMAGES:,} images per run; for more, run several with different --seed and "
        "--output_dir",
    )


def duration(seconds: float) -> str:
    """A rough human duration: '40 s', '12 minutes', '5.2 hours', '19 days'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86_400:.0f} days"


def resolve_balance(fields: Sequence[str]) -> tuple[str, ...]:
    out = []
    for f in fields:
        name = BALANCE_ALIASES.get(f.lower(), f.lower())
        if name not in BALANCE_VALUES:
            valid = ", ".join([*BALANCE_VALUES, *BALANCE_ALIASES])
            raise InputError("--balance", f"cannot balance over '{f}'", f"choose from {valid}")
        out.append(name)
    return tuple(dict.fromkeys(out))


def check_fixed(sex: str | None, age: float | None, site: str | None, skin_tone: str | None) -> None:
    """Validate subgroup values given on the command line against labels' vocabularies."""
    if sex is not None and sex not in labels.SEXES:
        raise InputError("--sex", f"'{sex}' is not valid", f"choose one of {', '.join(labels.SEXES)}")
    if age is not None and not 0 <= age <= labels.MAX_AGE:
        raise InputError("--age", f"{age} is outside 0..{labels.MAX_AGE}", "pass an age in years")
    if site is not None and site not in labels.SITE_GROUPS:
        raise InputError("--site", f"'{site}' is not a known body site", f"choose one of {', '.join(labels.SITES)}")
    if skin_tone is not None and skin_tone not in labels.SKIN_TONE_NAMES:
        raise InputError(
            "--skin_tone", f"'{skin_tone}' is not valid", f"choose one of {', '.join(labels.SKIN_TONE_NAMES)}"
        )


def parse_concepts(items: Sequence[str]) -> dict[str, str]:
    """``name=value`` switches -> a checklist dict, validated against labels.CONCEPTS."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip().lower(), value.strip().lower()
        if not sep or name not in labels.CONCEPT_BY_NAME:
            raise InputError(
                "--concepts",
                f"'{item}' is not name=value with a checklist concept",
                f"names: {', '.join(labels.CONCEPT_NAMES)}",
            )
        values = labels.CONCEPT_BY_NAME[name].values
        if value not in values:
            raise InputError("--concepts", f"{name} '{value}' is not valid", f"choose one of {', '.join(values)}")
        out[name] = value
    return out


@dataclass(frozen=True)
class Contrast:
    """One switch for paired generation: ``field`` (a checklist concept or skin_tone) set to ``on`` or ``off``."""

    field: str
    on: str
    off: str

    @property
    def label(self) -> str:
        return f"{self.field}={self.on}:{self.off}"


# The default skin-tone pair: the lightest band and one far from it that dermoscopy sets still contain.
SKIN_TONE_CONTRAST = ("very light", "brown")


def parse_contrasts(items: Sequence[str]) -> tuple[Contrast, ...]:
    """``NAME``, ``NAME=ON`` or ``NAME=ON:OFF`` -> contrasts. A concept's OFF defaults to 'absent' and its ON
    to its first present value (``blue_whitish_veil`` -> present:absent); ``skin_tone`` to very light:brown."""
    out = []
    for item in items:
        name, _, values = item.partition("=")
        name = name.strip().lower()
        on, _, off = (v.strip().lower() for v in values.partition(":"))
        if name == "skin_tone":
            valid = labels.SKIN_TONE_NAMES
            on, off = on or SKIN_TONE_CONTRAST[0], off or SKIN_TONE_CONTRAST[1]
        elif name in labels.CONCEPT_BY_NAME:
            valid = labels.CONCEPT_BY_NAME[name].values
            on, off = on or valid[1], off or "absent"
        else:
            raise InputError(
                "--contrast",
                f"'{item}' names no checklist concept or skin_tone",
                f"use one of {', '.join(labels.CONCEPT_NAMES)}, skin_tone",
            )
        for value in (on, off):
            if value not in valid:
                raise InputError("--contrast", f"{name} '{value}' is not valid", f"choose from {', '.join(valid)}")
        if on == off:
            raise InputError("--contrast", f"'{item}' switches {name} to the same value", "give two different values")
        out.append(Contrast(name, on, off))
    if len({c.field for c in out}) < len(out):
        raise InputError("--contrast", "names a field twice", "give each concept once")
    return tuple(out)


def contrast_plan(plan: Sequence[ImageSpec], contrasts: Sequence[Contrast]) -> list[ImageSpec]:
    """Two specs per planned image and contrast, identical (image id, seed, prompt phrasing, every other fact)
    except for the switched field, so the pair's pixel difference measures what that one word does."""
    out = []
    for spec in plan:
        for c in contrasts:
            for value in (c.on, c.off):
                if c.field == "skin_tone":
                    changed = {"skin_tone": value}
                else:
                    concepts = dict(spec.concepts) | {c.field: value}
                    changed = {
                        "concepts": tuple((n, concepts[n]) for n in labels.CONCEPT_NAMES if n in concepts),
                        "concept_source": spec.concept_source
                        if "requested" in spec.concept_source
                        else ("requested+imputed" if spec.concept_source == "imputed" else "requested"),
                    }
                out.append(replace(spec, contrast=c.label, variant=value, **changed))
    return out


def pair_partners(plan: Sequence[ImageSpec]) -> dict[str, ImageSpec]:
    """Each --contrast image's partner (same image id and switch, the other value), by file stem."""
    pairs: dict[tuple[str, str], list[ImageSpec]] = {}
    for spec in plan:
        if spec.contrast:
            pairs.setdefault((spec.image_id, spec.contrast), []).append(spec)
    return {a.stem: b for pair in pairs.values() if len(pair) == 2 for a, b in (pair, pair[::-1])}


def _csv_value(column: str, text: str, where: str) -> tuple[str, str]:
    """Normalise one distribution cell value to (field, value); raises ValueError naming the problem."""
    value = text.strip().lower() or "unknown"
    if column in ("site", "localization"):
        if value not in labels.SITE_GROUPS:
            raise ValueError(f"unknown site '{text}' (valid: {', '.join(labels.SITES)})")
        return "site", value
    if column == "age":
        if value in ("unknown", "nan"):
            return "age_bin", "unknown"
        return "age_bin", labels.age_bin(float(value))
    valid = {
        "sex": labels.SEXES,
        "age_bin": (*labels.AGE_BIN_NAMES, "unknown"),
        "site_group": labels.SITE_GROUP_NAMES,
        "skin_tone": (*labels.SKIN_TONE_NAMES, "unknown"),
    }[column]
    if value not in valid:
        raise ValueError(f"{column} '{text}' is not one of {', '.join(valid)}")
    return column, value


def read_distribution(path: str | Path) -> Distribution:
    """Read a subgroup distribution: one row per cell with a weight column, or one row per image.

    Recognised columns: dx/label/condition, sex, age_bin or age, site_group, site or localization,
    skin_tone, and weight/count/n/fraction (absent: each row counts once, so a real metadata file
    gives its own demographics). Other columns are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "distribution CSV not found", "check --distribution")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [c.strip().lower() for c in reader.fieldnames or []]
            rows = [{k.strip().lower(): (v or "") for k, v in r.items() if k is not None} for r in reader]
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    dx_col = next((c for c in DX_COLUMNS if c in header), None)
    weight_col = next((c for c in WEIGHT_COLUMNS if c in header), None)
    sub_cols = [c for c in SUBGROUP_COLUMNS if c in header]
    if "age_bin" in sub_cols and "age" in sub_cols:
        sub_cols.remove("age")
    if "site" in sub_cols and "localization" in sub_cols:
        sub_cols.remove("localization")
    if not sub_cols:
        raise InputError(
            path, f"no subgroup column (has: {', '.join(header)})", f"add one of {', '.join(SUBGROUP_COLUMNS)}"
        )
    if not rows:
        raise InputError(path, "the CSV has a header but no rows", "add one row per subgroup cell")
    weights: dict[tuple[str | None, Cell], float] = {}
    for i, r in enumerate(rows):
        line = i + 2
        try:
            dx = None
            if dx_col:
                key = r[dx_col].strip()
                if key.lower() == labels.OTHER:
                    continue
                try:
                    dx = labels.condition(key).code
                except KeyError as e:
                    raise ValueError(str(e).strip("\"'")) from None
            w = float(r[weight_col]) if weight_col else 1.0
            if not 0 <= w < math.inf:  # float() reads 'nan' and 'inf', which would make every draw nan
                raise ValueError(f"{weight_col} '{r[weight_col]}' is not a finite number >= 0")
            cell = tuple(sorted(_csv_value(c, r[c], str(path)) for c in sub_cols))
        except ValueError as e:
            raise InputError(f"{path} line {line}", str(e), "fix the value") from None
        weights[(dx, cell)] = weights.get((dx, cell), 0.0) + w
    cells = tuple((dx, cell, w) for (dx, cell), w in weights.items() if w > 0)
    if not cells:
        raise InputError(path, "every weight is zero", "give some cells a positive weight")
    return Distribution(str(path), cells, tuple(([dx_col] if dx_col else []) + sub_cols))


def _cells_for(dx: str, balance: tuple[str, ...], distribution: Distribution | None) -> tuple[list[Cell], list[float]]:
    if distribution is not None:
        chosen = [(cell, w) for d, cell, w in distribution.cells if d in (None, dx)]
        if not chosen:
            raise InputError(
                distribution.source,
                f"no rows for {labels.BY_CODE[dx].name} ({dx})",
                "add rows for it or drop its dx column",
            )
        return [c for c, _ in chosen], [w for _, w in chosen]
    cells: list[Cell] = [()]
    for f in balance:
        cells = [(*c, (f, v)) for c in cells for v in BALANCE_VALUES[f]]
    return [tuple(sorted(c)) for c in cells], [1.0] * len(cells)


def _draw_age(age_bin: str, rng: random.Random) -> float | None:
    """An age within the bin, in HAM10000's 5-year steps (so prompts look like the training captions)."""
    for name, lo, hi in labels.AGE_BINS:
        if name == age_bin:
            top = min(hi, 95)
            return float(rng.randrange(int(lo) + (5 if lo == 0 else 0), int(top), 5))
    return None


def _draw_site(group: str, rng: random.Random) -> str:
    sites = [s for s, g in labels.SITE_GROUPS.items() if g == group and s != g]
    return rng.choice(sites) if sites else group


def build_plan(
    codes: Sequence[str],
    num_images: int | Mapping[str, int],
    seed: int = 0,
    *,
    balance: Sequence[str] = (),
    distribution: Distribution | None = None,
    sex: str | None = None,
    age: float | None = None,
    site: str | None = None,
    skin_tone: str | None = None,
    concepts: dict[str, str] | None = None,
    impute: bool = True,
    guidance_scales: Sequence[float] = FAST_GUIDANCE_SCALES,
    steps: Sequence[int] = FAST_STEPS,
    single: bool = False,
) -> list[ImageSpec]:
    """``num_images`` specs per condition (or, as a mapping, per dx code: ``class_mix``), spread over the subgroup
    cells, in a seeded order.

    Dataset plans name images ``<dx>_<index:06d>`` and derive each seed from (seed, dx, index);
    single plans use seeds ``seed, seed+1, ...`` directly so a seed from a manifest can be reused.
    """
    per_code = dict(num_images) if isinstance(num_images, Mapping) else dict.fromkeys(codes, num_images)
    if isinstance(num_images, Mapping):
        if any(n < 0 for n in per_code.values()) or sum(per_code.values()) < 1:
            raise InputError(
                "--total_images", f"{sum(per_code.values())} is not positive", "ask for at least one image"
            )
        check_plan_size(sum(per_code.values()), f"--total_images {sum(per_code.values())}")
    else:
        if num_images < 1:
            raise InputError("--num_images", f"{num_images} is not positive", "ask for at least one image")
        check_plan_size(num_images * len(codes), f"--num_images {num_images}")
    if not guidance_scales or not steps or min(steps) < 1:
        raise InputError(
            "--num_inference_steps", "needs one or more positive step counts", "e.g. --num_inference_steps 50"
        )
    balance = resolve_balance(balance)
    check_fixed(sex, age, site, skin_tone)
    fixed = {"sex": sex, "age_bin": age, "site_group": site, "skin_tone": skin_tone}
    for f in balance:
        if fixed[f] is not None:
            raise InputError(
                "--balance", f"{f} is both balanced and fixed", "drop it from --balance or drop the fixed value"
            )
    if distribution is not None and balance:
        raise InputError("--balance", "cannot be combined with --distribution", "use one of them")
    if distribution is not None:
        fields = {
            "site_group" if c in ("site", "localization") else "age_bin" if c == "age" else c
            for c in distribution.columns
        }
        clash = [f for f, v in fixed.items() if v is not None and f in fields]
        if clash:
            raise InputError("--distribution", f"sets {', '.join(clash)}, which is also fixed", "drop the fixed value")
    concepts = dict(concepts or {})
    sizes = [len(BALANCE_VALUES[f]) for f in balance]
    # In a class mix each class's leftovers start where the last class's ended, so with one balanced field the whole
    # set is even to within one image as well as each class (with several, each class is, and the set nearly).
    carry: tuple[int, ...] | None = None
    plan: list[ImageSpec] = []
    for dx in codes:
        n = per_code.get(dx, 0)
        if n == 0:
            continue
        cells, weights = _cells_for(dx, balance, distribution)
        rng = random.Random(f"plan:{seed}:{dx}")
        if distribution is None:
            walk = diagonal_walk(sizes, rng, carry)
            counts = allocate_balanced(n, sizes, walk)
            if isinstance(num_images, Mapping):
                carry = walk[n % len(walk)]
        else:
            counts = allocate(n, weights, rng)
        assigned = interleave(cells, counts, rng)
        for index, cell in enumerate(assigned):
            s = seed + index if single else image_seed(seed, dx, index)
            plan.append(_spec(dx, index, s, dict(cell), fixed, concepts, impute, guidance_scales, steps, single))
    return plan


def _spec(
    dx: str,
    index: int,
    seed: int,
    cell: dict[str, str],
    fixed: dict,
    concepts: dict[str, str],
    impute: bool,
    guidance_scales: Sequence[float],
    steps: Sequence[int],
    single: bool,
) -> ImageSpec:
    def rng(purpose: str) -> random.Random:
        return random.Random(f"{seed}:{purpose}")

    site = fixed["site_group"] or cell.get("site", "unknown")
    if site == "unknown" and cell.get("site_group", "unknown") != "unknown":
        site = _draw_site(cell["site_group"], rng("site"))
    age = fixed["age_bin"]
    if age is None and cell.get("age_bin", "unknown") != "unknown":
        age = _draw_age(cell["age_bin"], rng("age"))
    drawn = impute_concepts(dx, rng("concepts")) if impute else {}
    merged = {**drawn, **concepts}
    source = "imputed" if drawn else "none"
    if concepts:
        source = "requested+imputed" if drawn else "requested"
    return ImageSpec(
        dx=dx,
        index=index,
        image_id=f"{dx}_seed{seed}" if single else f"{dx}_{index:06d}",
        seed=seed,
        guidance_scale=float(rng("guidance").choice(list(guidance_scales))),
        num_inference_steps=int(rng("steps").choice(list(steps))),
        sex=fixed["sex"] or cell.get("sex", "unknown"),
        age=age,
        site=site,
        skin_tone=fixed["skin_tone"] or cell.get("skin_tone", "unknown"),
        concepts=tuple((n, merged[n]) for n in labels.CONCEPT_NAMES if n in merged),
        concept_source=source,
    )


def shard(plan: Sequence[ImageSpec], process_index: int, num_processes: int) -> list[ImageSpec]:
    """This process's share of the plan; the shards are disjoint and their union is the plan."""
    return list(plan[process_index::num_processes])


def summarize_plan(plan: Sequence[ImageSpec]) -> dict:
    """Counts per condition and per subgroup field, for the run's config file and its tests; each sums to the total."""
    dx = Counter(s.dx for s in plan)
    out: dict = {"total": len(plan), "per_condition": {c: dx[c] for c in labels.CODES if c in dx}}
    for f in labels.SUBGROUP_FIELDS:
        out[f] = dict(Counter(getattr(s, f) for s in plan))
    out["guidance_scale"] = dict(Counter(s.guidance_scale for s in plan))
    out["num_inference_steps"] = dict(Counter(s.num_inference_steps for s in plan))
    return out


def describe_plan(summary: dict) -> list[str]:
    """The plan as a person checks it before a long run: its total, then its counts per class and per subgroup field
    (each line sums to the total) and its sampling settings."""
    lines = [f"plan: {summary['total']:,} images"]
    for name, key in [("class", "per_condition"), *((f, f) for f in labels.SUBGROUP_FIELDS)]:
        counts = summary[key]
        if name != "class" and set(counts) == {"unknown"}:
            continue  # a field the plan does not set: every image says nothing of it
        order = {v: i for i, v in enumerate(BALANCE_VALUES.get(key, ()))}  # the vocabulary's order, unknown last
        ordered = sorted(counts.items(), key=lambda kv: order.get(kv[0], len(order)))
        lines.append(f"  {name}: " + ", ".join(f"{value} {n:,}" for value, n in ordered))
    for key in ("guidance_scale", "num_inference_steps"):
        lines.append(f"  {key}: " + ", ".join(f"{value:g} ({n:,})" for value, n in sorted(summary[key].items())))
    return lines
