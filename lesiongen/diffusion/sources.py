"""Real images as a generation source: the plans of ``--mode edit`` and ``--mode augment``. Pure, no torch.

A text plan (``plans.build_plan``) draws its records; a source plan takes them from real images: a
build_captions split, whose ``metadata.jsonl`` gives each image's labels and caption, or a plain folder of
image files, labelled by ``--condition``. Both give ``ImageSpec`` lists to the same sampler, manifest and
resume path; a source spec names its image (``source``) and, where the caption is the image's own, carries
it (``text``). ``edit`` makes ``--variants_per_image`` (default 1) of each source, each with its own seed;
``augment`` makes them (default 2) of each training image, each also with its own caption phrasing, so a
classifier can be given anchored variants.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from .. import labels
from ..captions.metadata import LesionRecord
from ..cli import option
from ..errors import InputError
from ..images import list_images
from ..tables import METADATA, SPLITS, find_tables, read_metadata
from . import plans

IMAGE_MODES = ("edit", "augment")
KEEP_CHOICES = ("lesion",)
# Settings that change which images an edit or augment run makes or how they look; a resume must match them.
SOURCE_FIELDS = (
    "mode", "data_dir", "split", "strength", "variants_per_image", "keep", "keep_margin", "mask_dir", "tone_guide",
    "variant_skin_tones",
)  # fmt: skip


@dataclass
class SourceOptions:
    """Image-to-image flags (``generate.py`` inherits them): where the real images come from and how far to move."""

    data_dir: str | None = option(
        None,
        help="edit/augment: real images, a build_captions folder (with --split; its metadata.jsonl gives labels and "
        "captions) or a plain folder of image files (labelled by --condition)",
    )
    split: str = option("train", help="edit/augment: the build_captions split to read", choices=SPLITS)
    strength: float = option(
        0.5,
        help="edit/augment: how far from the source, in (0, 1] (SDEdit: the share of the denoising schedule run "
        "from the source's noised latents; 1.0 starts from noise)",
    )
    variants_per_image: int | None = option(
        None,
        help="edit/augment: images made from each source, each with its own seed (augment: and caption phrasing); "
        "default 1 for edit, 2 for augment",
    )
    keep: str | None = option(
        None,
        help="edit/augment: keep the lesion's pixels (the analyzer's lesion mask, blended in the latents at every "
        "step and pasted back after decoding)",
        choices=KEEP_CHOICES,
    )
    keep_margin: int = option(4, help="--keep lesion: pixels (at the generated size) the lesion mask is dilated by")
    mask_dir: str | None = option(
        None,
        help="--keep lesion: stored lesion masks, <image stem>.png (the masks/ folder of python -m "
        "lesiongen.captions.analyze); an image without one gets the analyzer's mask computed",
    )
    variant_skin_tones: list[str] = option(
        [],
        help="edit/augment: each variant's skin tone drawn from these (its own seed), e.g. 'very light' light "
        "intermediate tan brown dark; with --keep lesion the lesion stays and the skin around it changes",
        choices=labels.SKIN_TONE_NAMES,
    )
    tone_guide: bool = option(
        True,
        help="--keep lesion with --skin_tone: start each edit from the source with its skin recoloured to the asked "
        "tone's ITA (the caption alone moves it by a few degrees); false: the caption only",
    )


def check_source_options(cfg) -> None:
    """Flag combinations an edit or augment run refuses before any model loads (``GenerateConfig`` calls it)."""
    if not 0.0 < cfg.strength <= 1.0:  # also false for nan
        raise InputError("--strength", f"{cfg.strength} is outside (0, 1]", "e.g. --strength 0.5 (1.0: from noise)")
    if cfg.mode not in IMAGE_MODES:
        given = [f"--{f}" for f in ("data_dir", "keep", "mask_dir") if getattr(cfg, f) is not None]
        given += ["--variant_skin_tones"] * bool(cfg.variant_skin_tones)
        if given:
            raise InputError(given[0], f"applies to --mode edit or augment, not {cfg.mode}", "add --mode edit")
        return
    if cfg.data_dir is None:
        raise InputError(f"--mode {cfg.mode}", "needs real images", "pass --data_dir (a build_captions folder)")
    if not Path(cfg.data_dir).is_dir():
        raise InputError(f"--data_dir {cfg.data_dir}", "folder not found", "pass a build_captions or image folder")
    runs = int(min(cfg.num_inference_steps) * cfg.strength)  # what diffusers' image-to-image pipelines run
    if runs < 1:
        raise InputError(
            "--strength",
            f"{cfg.strength} of {min(cfg.num_inference_steps)} steps runs no denoising step",
            "raise --strength or --num_inference_steps",
        )
    text_only = {"--num_images": cfg.num_images, "--contrast": cfg.contrast, "--balance": cfg.balance}
    text_only["--distribution"] = cfg.distribution
    for flag, value in text_only.items():
        if value:
            raise InputError(flag, f"plans text-to-image sets, not --mode {cfg.mode}", f"drop {flag}")
    if cfg.variants_per_image is not None and cfg.variants_per_image < 1:
        raise InputError("--variants_per_image", f"{cfg.variants_per_image} is not positive", "e.g. 4")
    if cfg.variant_skin_tones and cfg.skin_tone:
        raise InputError("--variant_skin_tones", "and --skin_tone both set the skin tone", "drop one of them")
    if cfg.keep_margin < 0:
        raise InputError("--keep_margin", f"{cfg.keep_margin} is negative", "e.g. --keep_margin 4")
    if cfg.mask_dir is not None and not Path(cfg.mask_dir).is_dir():
        raise InputError(f"--mask_dir {cfg.mask_dir}", "folder not found", "pass analyze.py's masks/ folder")
    if cfg.mode == "augment" and is_captions_folder(Path(cfg.data_dir)) and cfg.split != "train":
        # a variant inherits its source's split; one of a validation or test image must never reach training
        raise InputError(
            f"--split {cfg.split}", "augment makes training variants", "use --split train (edit any split)"
        )


def is_captions_folder(folder: Path) -> bool:
    return (folder / METADATA).is_file() or any((folder / s / METADATA).is_file() for s in SPLITS)


def source_rows(cfg) -> list[tuple[dict, str]]:
    """(metadata row, source path) of each real image, in the folder's order. A plain image folder's rows carry
    only ``image_id`` and ``--condition``'s diagnosis. The path is absolute (links kept as given): the manifest's
    ``source`` column must open from wherever its reader runs, not only from the folder generate.py ran in."""
    folder = Path(cfg.data_dir).absolute()
    if is_captions_folder(folder):
        (table,) = find_tables(folder, None if (folder / METADATA).is_file() else cfg.split)
        where = table.parent.relative_to(folder)
        return [(row, (folder / where / row["file_name"]).as_posix()) for _, row in read_metadata(table)]
    files = list_images(folder)
    if not files:
        raise InputError(f"--data_dir {folder}", "has no metadata.jsonl and no images", "check --data_dir")
    codes = plans.resolve_codes(cfg.condition)
    if len(codes) != 1:
        raise InputError(
            "--condition", "a plain image folder carries no diagnosis", "name one condition, e.g. --condition mel"
        )
    rows = []
    for path in files:
        name = path.relative_to(folder).with_suffix("").as_posix().replace("/", "__")
        rows.append(({"image_id": name, "dx": codes[0], "label": codes[0]}, path.as_posix()))
    return rows


def changed_record(record: LesionRecord, cfg) -> LesionRecord:
    """The record with ``--sex/--age/--site/--skin_tone/--concepts`` applied: the caption the edit asks for."""
    fixed = {"sex": cfg.sex, "age": cfg.age, "site": cfg.site, "skin_tone": cfg.skin_tone}
    changes = {k: v for k, v in fixed.items() if v is not None}
    requested = plans.parse_concepts(cfg.concepts)
    if requested:
        source = "requested" if record.concept_source == "none" else f"{record.concept_source}+requested"
        changes.update(concepts={**record.concepts, **requested}, concept_source=source)
    return replace(record, **changes)


def draw(seed: int, purpose: str, values):
    """One of ``values`` from the image's own RNG for ``purpose``, as text plans draw guidance and steps."""
    return random.Random(f"{seed}:{purpose}").choice(list(values))


def source_plan(cfg, field: str) -> list[plans.ImageSpec]:
    """One spec per output image: ``--variants_per_image`` of each source (``--condition``'s diagnoses only).
    Seeds, guidance and steps are drawn per image from its id, so adding images to the folder changes no
    other image. An edit that changes no field keeps the source's own caption in ``field``; augment variants
    are captioned anew, each phrasing drawn from its own id."""
    codes = set(plans.resolve_codes(cfg.condition))
    changes = any((cfg.sex, cfg.age, cfg.site, cfg.skin_tone, cfg.concepts, cfg.variant_skin_tones))
    variants = cfg.variants_per_image or (2 if cfg.mode == "augment" else 1)
    plan, count = [], dict.fromkeys(codes, 0)
    for row, source in source_rows(cfg):
        dx = row.get("dx") or row.get("label", "")
        record = LesionRecord.from_row({"lesion_id": row.get("image_id"), "dataset": "real", **row, "dx": dx})
        if record.dx not in codes:
            continue
        record = changed_record(record, cfg)
        base = record.image_id.replace("/", "__")
        for v in range(variants):
            image_id = base if cfg.mode == "edit" and variants == 1 else f"{base}_v{v}"
            seed = plans.image_seed(cfg.seed, image_id, v)
            if cfg.variant_skin_tones:
                record = replace(record, skin_tone=draw(seed, "skin_tone", cfg.variant_skin_tones))
            own_text = row.get(field) if cfg.mode == "edit" and not changes else None
            plan.append(
                plans.ImageSpec(
                    dx=record.dx,
                    index=count[record.dx],
                    image_id=image_id,
                    seed=seed,
                    guidance_scale=float(draw(seed, "guidance", cfg.guidance_scale)),
                    num_inference_steps=int(draw(seed, "steps", cfg.num_inference_steps)),
                    sex=record.sex,
                    age=record.age,
                    site=record.site,
                    skin_tone=record.skin_tone,
                    concepts=tuple((n, record.concepts[n]) for n in labels.CONCEPT_NAMES if n in record.concepts),
                    concept_source=record.concept_source,
                    source=source,
                    text=own_text or "",
                )
            )
            count[record.dx] += 1
    if not plan:
        raise InputError(f"--data_dir {cfg.data_dir}", f"has no image of --condition {cfg.condition}", "check both")
    return plan
