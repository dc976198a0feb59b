"""The ``generate.py`` stage: a trained model -> single images or a labelled, resumable synthetic dataset.

Dataset layout (read back by ``tables.read_image_table(OUTPUT_DIR)``, and by
``datasets.load_dataset("imagefolder", data_dir=OUTPUT_DIR)``, which reads the images metadata.jsonl lists)::

    OUTPUT_DIR/dataset/<Condition>/<dx>_<index>.png
    OUTPUT_DIR/manifest.csv              one row per image on disk, appended after the image is in place
    OUTPUT_DIR/metadata.jsonl            the manifest's rows, typed, for Hugging Face's imagefolder (rewritten whole)
    OUTPUT_DIR/generation_config.json    the settings the plan came from, checked on resume
    OUTPUT_DIR/contact_sheet.png         a grid per condition (listed in no metadata, so no dataset row)

Single mode writes the same files under ``OUTPUT_DIR/single/`` with images named by seed. Edit and augment
modes write the dataset layout from real images (``sources.py`` plans them, ``edit.py`` samples them).
Prompts come from ``captions.caption`` on a ``LesionRecord``, the same code that captioned the training data.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .. import labels
from ..captions.metadata import LesionRecord
from ..captions.text import STYLES, caption
from ..cli import option, run_stage
from ..devices import compile_choice, resolve_device
from ..errors import InputError
from ..files import atomic_path, write_json
from ..images import image_grid, open_rgb
from ..tokens import fits_clip
from . import plans, targets
from .manifest import MANIFEST_COLUMNS, Manifest
from .pipeline import model_identity, resolve_model
from .sources import IMAGE_MODES, SOURCE_FIELDS, SourceOptions, check_source_options, source_plan

# name -> (diffusers class, extra config); built from the model's own scheduler config so betas match.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),  # SD3 and Flux (rectified flow) sample with this one
}
FLOW_SCHEDULERS = ("flow_euler",)
MODES = ("single", "dataset", *IMAGE_MODES)
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
# --torch_compile auto compiles sets of at least this many denoising steps (images x steps). On this project's
# 2-core CPU the tiny UNet's compile cost about 45 s (both cores, cold cache; about 200 s on one busy core) and,
# with the text keys padded, saved about 2 ms per image-step at batch 16 (docs/results.md): it repays itself
# after about 750 images at 30 steps, so the threshold keeps a margin. The default 100 images per condition
# (7,000 steps at the default 10; about 44,000 with --original_grid) and the demo's sets stay eager.
COMPILE_AFTER_DENOISING_STEPS = 50_000
# Settings past these are typing slips, not experiments: the original draws guidance from 3-10 and a LoRA is
# trained for scale 1 (negative scales invert it); 1e38 overflowed the guided prediction to inf and black images.
MAX_GUIDANCE = 100.0
MAX_LORA_SCALE = 10.0
# metadata.jsonl is rewritten from the manifest after a batch once this long has passed since the last rewrite
# (and at least 20 times the last rewrite's own time, so a million-row file costs under 5% of the run).
METADATA_EVERY_S = 30.0
# Settings that change which images a dataset run makes or how they look; a resume must match them.
PLAN_FIELDS = (
    "condition", "num_images", "total_images", "class_weights", "seed", "balance", "distribution", "sex", "age", "site",
    "skin_tone", "concepts", "impute_concepts", "contrast", "caption_style", "guidance_scale", "num_inference_steps",
    "scheduler", "model_path", "base_model", "negative_prompt", "resolution", "lora_scale",
    "contrast_guidance", "target", "target_field",
)  # fmt: skip


@dataclass
class GenerateConfig(SourceOptions):
    """Generate dermoscopic images from a trained LesionGen model: one per condition, a labelled dataset, or
    edits and variants of real images."""

    condition: str = option("all", help="condition name or dx code (any case), several joined by commas, or 'all'")
    mode: str = option(
        "single",
        help="single: a quick image per condition; dataset: a labelled, resumable set; edit: one image-to-image "
        "edit of each real image (--data_dir); augment: --variants_per_image of each training image",
        choices=MODES,
    )
    num_images: int | None = option(None, help="images per condition (default: 1 in single mode, 100 in dataset mode)")
    total_images: int | None = option(
        None,
        help="dataset mode: this many images in all, split over the classes by --class_weights (else by the "
        "--distribution file's dx weights, else equally), the counts summing exactly to it",
    )
    class_weights: list[str] = option(
        [],
        help="class mix for --total_images as code=weight, joined by commas, e.g. nv=0.4,mel=0.15,bcc=0.15,bkl=0.1,"
        f"akiec=0.1,df=0.05,vasc=0.05 (codes: {', '.join(labels.CODES)}; weights are normalised)",
    )
    target: str | None = option(
        None,
        help="a classifier's metrics.json (classification/eval.py) to aim a --total_images run at what it gets wrong, "
        f"instead of --class_weights: class weight (1 - recall) + {targets.FLOOR:g} and, within each class, group "
        f"weight (1 - accuracy) + {targets.FLOOR:g} over --target_field's groups, each normalised; a class without a "
        "recall and a group the metrics do not rank take the mean weight",
    )
    target_field: str | None = option(
        None,
        help="with --target, the subgroup field whose groups it weights: "
        f"{', '.join(plans.BALANCE_VALUES)} (default: the field with the lowest-scoring ranked group)",
    )
    output_dir: str = option("outputs/generated", help="where images, manifest.csv and the contact sheet go")
    model_path: str = option(
        "outputs/lesiongen-lora", help="a LoRA folder (train_lora.sh) or a full pipeline folder (train_SD.sh)"
    )
    base_model: str | None = option(None, help="base pipeline for a LoRA (default: the one its config.json records)")
    allow_base_mismatch: bool = option(
        False,
        help="load a LoRA on a base other than the one it was trained on (another fine-tune of the same family), "
        "with a warning; generation_config.json records both fingerprints",
    )
    device: str = option(
        "auto", help="auto (the accelerate process's device, else cuda if available), cpu, cuda, cuda:1..."
    )
    dtype: str = option("auto", help="auto = float16 on CUDA, float32 elsewhere", choices=DTYPE_CHOICES)
    scheduler: str = option("dpmsolver++", help="sampler", choices=tuple(SCHEDULERS))
    guidance_scale: list[float] = option(
        list(plans.FAST_GUIDANCE_SCALES),
        help="one value, or several to draw from per image (default: docs/results.md's quality-matched setting)",
    )
    num_inference_steps: list[int] = option(
        list(plans.FAST_STEPS),
        help="one value, or several to draw from per image (default: 10, with DPM-Solver++ as good as the original "
        "sampler at 50; docs/results.md)",
    )
    original_grid: bool = option(
        False,
        help="draw each image's guidance (3 5 7.5 10) and steps (30 50 70 100) from the original LesionGen's grid, "
        "instead of --guidance_scale and --num_inference_steps: about 6x the default's compute",
    )
    batch_size: int = option(
        16,
        help="images per forward pass (images sharing guidance and steps are batched); where a batch runs out of "
        "GPU memory it halves, and sampling goes on at the size that fits",
    )
    torch_compile: str = option(
        "auto",
        help="torch.compile the denoiser (on a CPU with its text keys padded to 80, which the CPU attention kernel "
        "runs faster than 77): faster batches after a slow first one. auto compiles sets of at least "
        f"{COMPILE_AFTER_DENOISING_STEPS} denoising steps in all (images x steps), where the compile time pays back "
        "(docs/results.md), on a device with the compiler it needs, and falls back to eager if compiling fails",
        choices=("auto", "true", "false"),
        bare="true",
    )
    negative_prompt: str = option("", help="negative prompt for classifier-free guidance")
    seed: int = option(0, help="plan seed; single mode uses seed, seed+1, ... as the images' seeds")
    caption_style: str = option("concept", help="prompt style, as in build_captions.py", choices=tuple(STYLES))
    sex: str | None = option(None, help="fix the patient's sex in every prompt", choices=labels.SEXES)
    age: float | None = option(None, help="fix the patient's age in years")
    site: str | None = option(None, help="fix the body site", choices=labels.SITES)
    skin_tone: str | None = option(None, help="fix the skin tone (ITA band)", choices=labels.SKIN_TONE_NAMES)
    concepts: list[str] = option([], help="checklist concept switches as name=value, e.g. blue_whitish_veil=present")
    contrast: list[str] = option(
        [],
        help="paired generation: for every planned image, two that share seed and prompt but for this switch, e.g. "
        "blue_whitish_veil (present:absent), streaks=irregular:regular, skin_tone (very light:brown)",
    )
    contrast_guidance: bool = option(
        False,
        help="with --contrast, each image of a pair takes the other's prompt as its negative prompt, so guidance "
        "pushes along the switched concept alone (the two still differ in that one switch only)",
    )
    impute_concepts: bool = option(True, help="draw the other concepts from Derm7pt's per-diagnosis frequencies")
    balance: list[str] = option(
        [],
        help="spread images evenly over these subgroup fields",
        choices=(*plans.BALANCE_VALUES, *plans.BALANCE_ALIASES),
    )
    distribution: str | None = option(
        None, help="CSV of subgroup cells (sex, age_bin, site_group, skin_tone, dx, weight) to follow"
    )
    lora_scale: float = option(1.0, help="strength of a LoRA adapter")
    resolution: int | None = option(None, help="image size (default: the model's)")
    contact_sheet: int = option(8, help="images per condition on contact_sheet.png (0: none)")

    def __post_init__(self) -> None:
        plans.resolve_codes(self.condition)
        default = GenerateConfig.__dataclass_fields__["model_path"].default
        if self.model_path == default and not Path(default).exists():
            # the default looks like a hub id too; say what it is instead of trying the hub
            raise InputError(
                f"--model_path {default}",
                "not found (the default is where train_lora.sh saves its LoRA)",
                "train first, or pass --model_path DIR (a LoRA or pipeline folder, e.g. from python -m lesiongen.diffusion.tiny --output_dir DIR)",
            )
        resolve_model(self.model_path, "--model_path")
        if self.num_images is not None and self.num_images < 1:
            raise InputError("--num_images", f"{self.num_images} is not positive", "ask for at least one image")
        self.check_class_mix()
        if self.original_grid and (
            self.guidance_scale != list(plans.FAST_GUIDANCE_SCALES)
            or self.num_inference_steps != list(plans.FAST_STEPS)
        ):
            raise InputError(
                "--original_grid",
                "draws each image's guidance and steps from the original's grid",
                "drop --guidance_scale and --num_inference_steps, or drop --original_grid",
            )
        if self.batch_size < 1:
            raise InputError("--batch_size", f"{self.batch_size} is not positive", "use e.g. 4")
        if self.contrast_guidance and not self.contrast:
            raise InputError("--contrast_guidance", "needs --contrast", "add e.g. --contrast blue_whitish_veil")
        if self.contrast_guidance and self.negative_prompt:
            raise InputError(
                "--contrast_guidance", "sets each image's negative prompt itself", "drop --negative_prompt or it"
            )
        if min(self.num_inference_steps) < 1:
            raise InputError("--num_inference_steps", "must be positive", "e.g. --num_inference_steps 50")
        if not all(0 <= g <= MAX_GUIDANCE for g in self.guidance_scale):  # also false for nan
            raise InputError(
                "--guidance_scale", f"must be a number in 0..{MAX_GUIDANCE:g}", "e.g. --guidance_scale 7.5"
            )
        if not abs(self.lora_scale) <= MAX_LORA_SCALE:  # also true for nan
            raise InputError("--lora_scale", f"must be a number in -{MAX_LORA_SCALE}..{MAX_LORA_SCALE}", "e.g. 1.0")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InputError("--resolution", f"{self.resolution} is not a positive multiple of 8", "e.g. 64, 256, 512")
        plans.check_fixed(self.sex, self.age, self.site, self.skin_tone)
        plans.parse_concepts(self.concepts)
        contrasts = plans.parse_contrasts(self.contrast)
        fixed = {*plans.parse_concepts(self.concepts), *(["skin_tone"] if self.skin_tone else [])}
        balanced = {*plans.resolve_balance(self.balance)}
        for c in contrasts:
            if c.field in fixed or c.field in balanced:
                raise InputError(
                    "--contrast",
                    f"{c.field} is also fixed or balanced",
                    f"drop {c.field} from --concepts/--skin_tone/--balance",
                )
        stated = (
            self.balance
            or self.distribution
            or self.concepts
            or self.contrast
            or self.target_field
            or any((self.sex, self.age, self.site, self.skin_tone))
        )
        if self.caption_style == "label" and stated:
            raise InputError(
                "--caption_style label",
                "label captions state only the diagnosis, so subgroup and concept targets would not reach the prompt",
                "use --caption_style concept or drop the targets",
            )
        if self.distribution is not None and not Path(self.distribution).is_file():
            raise InputError(self.distribution, "distribution CSV not found", "check --distribution")
        check_source_options(self)
        where = (
            f"--total_images {self.total_images}" if self.total_images else f"--num_images {self.images_per_condition}"
        )
        plans.check_plan_size(self.planned_images, where)

    def check_class_mix(self) -> None:
        """--total_images (a class mix of N in all) and --num_images (N per condition) are two ways to size a set;
        --target weights its classes and the groups of one field."""
        if self.target_field and not self.target:
            raise InputError("--target_field", "needs --target", "add --target METRICS.json or drop --target_field")
        if self.target:
            if self.total_images is None:
                raise InputError("--target", "needs --total_images", "add e.g. --total_images 10000")
            for flag, value in (("--class_weights", self.class_weights), ("--distribution", self.distribution)):
                if value:
                    raise InputError("--target", f"sets the weights {flag} sets", f"drop {flag} or --target")
            if self.balance:
                raise InputError("--target", "weights the groups of one field itself", "drop --balance")
            self.read_target()
        if self.total_images is None:
            if self.class_weights:
                raise InputError("--class_weights", "needs --total_images", "add e.g. --total_images 10000")
            return
        if self.num_images is not None:
            raise InputError(
                "--total_images",
                "cannot be combined with --num_images (images per condition)",
                "give one of them: --total_images N is N in all, split by --class_weights",
            )
        if self.mode != "dataset":
            raise InputError("--total_images", "needs --mode dataset", "add --mode dataset")
        if self.total_images < 1:
            raise InputError("--total_images", f"{self.total_images} is not positive", "ask for at least one image")
        if self.class_weights:
            plans.parse_class_weights(self.class_weights)

    def read_target(self) -> targets.Target | None:
        """--target's weights for the --condition classes, on --target_field or the worst field the run leaves free
        (none with label captions, which cannot state a subgroup)."""
        if not self.target:
            return None
        fixed = {"sex": self.sex, "age_bin": self.age, "site_group": self.site, "skin_tone": self.skin_tone}
        field = targets.resolve_field(self.target_field) if self.target_field else None
        if field and fixed[field] is not None:
            raise InputError("--target_field", f"{field} is also fixed", "drop the fixed value or choose another field")
        free = [f for f, v in fixed.items() if v is None and self.caption_style != "label"]
        return targets.read_target(self.target, plans.resolve_codes(self.condition), field, free)

    @property
    def images_per_condition(self) -> int:
        return self.num_images or (1 if self.mode == "single" else 100)

    @property
    def planned_images(self) -> int:
        """Images in the whole plan, known before it is built (a --contrast pair per switch doubles each)."""
        base = self.total_images or self.images_per_condition * len(plans.resolve_codes(self.condition))
        return base * (2 * len(self.contrast) if self.contrast else 1)

    def sampling_grid(self) -> tuple[list[float], list[int]]:
        """The guidance values and step counts each image draws from: the flags', or with --original_grid the
        original's."""
        if self.original_grid:
            return list(plans.ORIGINAL_GUIDANCE_SCALES), list(plans.ORIGINAL_STEPS)
        return self.guidance_scale, self.num_inference_steps


@dataclass(frozen=True)
class Processes:
    """Which share of the plan this process draws; from accelerate, or given (tests, manual sharding)."""

    index: int = 0
    count: int = 1
    wait: Callable[[], None] = lambda: None

    @property
    def is_main(self) -> bool:
        return self.index == 0


@dataclass
class GenerateResult:
    root: Path
    manifest: Path
    planned: int  # images in the whole plan
    generated: int  # images this process made in this run
    already_done: int  # of this process's share, found finished on disk
    seconds: float
    contact_sheet: Path | None


def make_plan(cfg: GenerateConfig) -> list[plans.ImageSpec]:
    if cfg.mode in IMAGE_MODES:
        return source_plan(cfg, prompt_field(cfg))
    distribution = plans.read_distribution(cfg.distribution) if cfg.distribution else None
    weights = plans.parse_class_weights(cfg.class_weights) if cfg.class_weights else None
    target = cfg.read_target()
    if target:  # --target replaces both (the config refuses them together)
        distribution, weights = target.distribution(), target.classes
    codes = plans.resolve_codes(cfg.condition)
    counts = cfg.images_per_condition
    if cfg.total_images is not None:
        counts = plans.class_mix(codes, cfg.total_images, cfg.seed, weights, distribution)
    guidance_scales, steps = cfg.sampling_grid()
    plan = plans.build_plan(
        codes,
        counts,
        cfg.seed,
        balance=cfg.balance,
        distribution=distribution,
        sex=cfg.sex,
        age=cfg.age,
        site=cfg.site,
        skin_tone=cfg.skin_tone,
        concepts=plans.parse_concepts(cfg.concepts),
        impute=cfg.impute_concepts and cfg.caption_style == "concept",
        guidance_scales=guidance_scales,
        steps=steps,
        single=cfg.mode == "single",
    )
    return plans.contrast_plan(plan, plans.parse_contrasts(cfg.contrast)) if cfg.contrast else plan


def negative_prompt(spec: plans.ImageSpec, cfg: GenerateConfig, partners: dict, field: str) -> str:
    """``--negative_prompt``, or with ``--contrast_guidance`` the pair partner's prompt: guidance then moves
    away from the other side of the switch, not from an empty prompt."""
    if spec.stem in partners:
        return build_prompt(partners[spec.stem].record(), cfg.caption_style, cfg.seed, field)
    return cfg.negative_prompt


def build_prompt(record: LesionRecord, style: str, seed: int, field: str = "text") -> str:
    """The caption build_captions.py would write for this record in the field the model trained on: one
    source of truth for prompt text. ``long_text`` (T5 families) is the report prose from the record's metadata."""
    if field == "long_text":
        from ..captions.reports import describe

        return describe(record, seed=seed)[2]
    return caption(record, style, seed, fits=fits_clip).text


def prompt_field(cfg: GenerateConfig) -> str:
    """The caption field the model trained on, as train.py recorded it, else its family's default."""
    from .families import detect_family
    from .pipeline import is_lora_dir, lora_base_model, lora_record

    source = resolve_model(cfg.model_path, "--model_path")
    recorded = lora_record(source).get("caption_field") if Path(source).is_dir() else None
    if recorded:
        return recorded
    base = (cfg.base_model or lora_base_model(source)) if is_lora_dir(source) else source
    return detect_family(resolve_model(base, "--base_model")).caption_field


def file_name(spec: plans.ImageSpec, mode: str) -> str:
    """Image path relative to the manifest's folder."""
    prefix = "" if mode == "single" else "dataset/"
    return f"{prefix}{spec.condition}/{spec.stem}.png"


def manifest_row(spec: plans.ImageSpec, cfg: GenerateConfig, prompt: str, negative: str) -> dict:
    """The manifest row: the same column names as build_captions' metadata.jsonl, plus sampling settings."""
    row = spec.record().to_row()
    row.update(
        file_name=file_name(spec, cfg.mode),
        text=prompt,
        label=spec.dx,
        condition=spec.condition,
        seed=spec.seed,
        guidance_scale=spec.guidance_scale,
        num_inference_steps=spec.num_inference_steps,
        scheduler=cfg.scheduler,
        model=cfg.model_path,
        negative_prompt=negative,
        index=spec.index,
        pair=spec.image_id if spec.contrast else "",
        contrast=spec.contrast,
        source=spec.source,
        strength=cfg.strength if spec.source else None,
    )
    return {c: "" if row.get(c) is None else row[c] for c in MANIFEST_COLUMNS}


def settings(cfg: GenerateConfig) -> dict:
    """The plan-defining settings, with the distribution CSV's and the --target file's content hashes so an edited
    file counts, and the sampling lists the images draw from (so a folder made with the original's grid resumes under --original_grid)."""
    out = {k: getattr(cfg, k) for k in PLAN_FIELDS}
    out["guidance_scale"], out["num_inference_steps"] = cfg.sampling_grid()
    out["num_images"] = cfg.images_per_condition if cfg.total_images is None else None
    if cfg.mode in IMAGE_MODES:
        out.update({k: getattr(cfg, k) for k in SOURCE_FIELDS})
    if cfg.distribution:
        out["distribution_sha256"] = hashlib.sha256(Path(cfg.distribution).read_bytes()).hexdigest()
    if cfg.target:
        out["target_sha256"] = hashlib.sha256(Path(cfg.target).read_bytes()).hexdigest()
    return out


# Settings that name a file or folder: the same one however it is spelled or linked.
PATH_FIELDS = ("model_path", "base_model", "distribution", "target", "data_dir", "mask_dir")


def same_setting(name: str, before, now) -> bool:
    """A folder's saved setting against the one given; a path is the same when both name one existing file or
    folder (a recipe's seed reaches the models through a link, another recipe through another link)."""
    if before == now:
        return True
    paths = name in PATH_FIELDS and isinstance(before, str) and isinstance(now, str)
    return paths and os.path.exists(now) and os.path.realpath(before) == os.path.realpath(now)


def check_resume(root: Path, cfg: GenerateConfig) -> None:
    """A dataset folder resumes only under the settings and the model that made it, so one folder never
    mixes two plans or two models (the same relative --model_path, run from another folder, is another model)."""
    path = root / "generation_config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    before = saved.get("settings", {})
    now = json.loads(json.dumps(settings(cfg)))
    # a setting newer than the folder counts as its default there: the folder was made without it
    defaults = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(GenerateConfig)}
    before = {k: before.get(k, defaults.get(k)) for k in now}
    diffs = [f"{k}: {before[k]!r} -> {now[k]!r}" for k in now if not same_setting(k, before[k], now[k])]
    model_before, model_now = saved.get("model") or {}, model_identity(cfg.model_path, cfg.base_model)
    diffs += [
        f"model {k}: {model_before[k]} -> {model_now[k]}"
        for k in ("fingerprint", "lora_sha256")
        if model_before.get(k) and model_now.get(k) and model_before[k] != model_now[k]
    ]
    if diffs:
        raise InputError(
            path,
            f"this folder was generated with other settings ({'; '.join(diffs)})",
            "rerun with the same flags or use a new --output_dir",
        )


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(
            f"--output_dir {root}", f"cannot write there ({e.strerror or e})", "choose a folder you can write to"
        ) from None


def accelerate_processes() -> Processes:
    """The accelerate/torchrun process layout; one process when not launched by them."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState, unlike Accelerator, ignores ACCELERATE_USE_CPU and would report one process on a CPU machine
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, state.wait_for_everyone)


def resolve_dtype(cfg: GenerateConfig, device: str) -> str:
    """float16 on CUDA (half the memory, tensor cores), float32 elsewhere: CPU half precision is slow or missing."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "float16" if device.startswith("cuda") else "float32"


def load_model(cfg: GenerateConfig, device: str):
    """The pipeline with the chosen sampler, in the dtype ``resolve_dtype`` picks."""
    from .pipeline import load_pipeline

    pipe = load_pipeline(
        cfg.model_path, cfg.base_model, device, resolve_dtype(cfg, device), allow_base_mismatch=cfg.allow_base_mismatch
    )
    set_scheduler(pipe, cfg.scheduler, model_scheduler_config(cfg))
    return pipe


def model_scheduler_config(cfg: GenerateConfig) -> dict:
    """The scheduler config saved with the model (a LoRA's base model): every sampler starts from it, because
    converting one sampler's config into the next would let settings drift on a reused pipeline."""
    from .pipeline import is_lora_dir, lora_base_model, scheduler_config

    base = (cfg.base_model or lora_base_model(cfg.model_path)) if is_lora_dir(cfg.model_path) else cfg.model_path
    return scheduler_config(resolve_model(base, "--base_model" if base != cfg.model_path else "--model_path"))


def set_scheduler(pipe, name: str, base_config: dict) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise InputError("--scheduler", f"unknown sampler '{name}'", f"choose one of {', '.join(SCHEDULERS)}")
    flow_model = base_config.get("_class_name", "").startswith("FlowMatch")
    if flow_model != (name in FLOW_SCHEDULERS):
        wanted = ", ".join(FLOW_SCHEDULERS if flow_model else [n for n in SCHEDULERS if n not in FLOW_SCHEDULERS])
        kind = "a rectified-flow model (SD3, Flux)" if flow_model else "a DDPM model (SD 1.x, 2.x, SDXL)"
        raise InputError("--scheduler", f"'{name}' cannot sample {kind}", f"choose one of {wanted}")
    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(base_config, **extra)


def sample(
    pipe,
    prompts: list[str],
    negatives: list[str],
    seeds: list[int],
    guidance: float,
    steps: int,
    cfg: GenerateConfig,
    lora: bool,
    inputs: list | None = None,
):
    """One batch; each image's starting noise comes from its own CPU generator, so its pixels do not
    depend on which batch or process it lands in (up to float rounding). ``inputs``: the sources of an edit."""
    import torch

    from .families import FAMILIES

    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    given = {"height": cfg.resolution, "width": cfg.resolution} if cfg.resolution else {}
    if inputs:  # an edit: the sources, their size, the strength
        from .edit import pipeline_inputs

        given = pipeline_inputs(pipe, inputs, seeds, cfg.strength)
    # the pipeline argument that scales a LoRA: cross_attention_kwargs (UNets) or joint_attention_kwargs
    name = type(pipe).__name__
    scale_kwarg = next(f.lora_scale_kwarg for f in FAMILIES.values() if name in (f.pipeline, f.image_pipeline))
    images = pipe(
        prompt=prompts,
        negative_prompt=negatives if any(negatives) else None,
        guidance_scale=guidance,
        num_inference_steps=steps,
        generator=generators,
        **{scale_kwarg: {"scale": cfg.lora_scale} if lora else None},
        output_type="np",  # floats, so save_batch sees a nan before conversion turns it into black
        **given,
    ).images
    return list(images)  # one array per image


class FittingBatches:
    """Samples a batch in chunks of the largest size that has fit in GPU memory so far: ``--batch_size`` at
    first, halved at each out-of-memory error, so a default that suits a large GPU also runs on a small one. An
    image's pixels do not depend on its batch (``sample``), so halving changes only the speed."""

    def __init__(self, size: int) -> None:
        self.size = size

    def sample(self, pipe, prompts: list[str], negatives: list[str], seeds: list[int], *args, inputs=None) -> list:
        import torch

        images: list = []
        while len(images) < len(prompts):
            chunk = slice(len(images), len(images) + self.size)
            try:
                images += sample(pipe, prompts[chunk], negatives[chunk], seeds[chunk], *args, inputs and inputs[chunk])
            except torch.OutOfMemoryError:
                if self.size == 1:
                    raise InputError(
                        "--batch_size 1",
                        "one image does not fit in GPU memory",
                        "use --dtype float16 (or bfloat16) or a lower --resolution",
                    ) from None
                self.size //= 2
                torch.cuda.empty_cache()
                print(f"note: a batch ran out of GPU memory; sampling {self.size} images at a time from here")
        return images


def compile_denoiser(pipe) -> None:
    """Compile the UNet (or a transformer family's denoiser) once per pipeline, on a CPU with its text keys
    padded first (``attention.py``). Graphs are specialised to the first batch size; a group's short last batch
    recompiles once with a dynamic batch dimension (torch's automatic dynamic shapes), not once per size."""
    import torch
    from diffusers.utils.torch_utils import is_compiled_module

    from .attention import pad_cross_attention_keys

    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    denoiser = getattr(pipe, name)
    if not is_compiled_module(denoiser):
        pad_cross_attention_keys(denoiser, pipe.device)
        setattr(pipe, name, torch.compile(denoiser))


def batches(specs: Sequence[plans.ImageSpec], size: int) -> list[list[plans.ImageSpec]]:
    """Chunks of specs sharing guidance and steps (the pipeline takes one of each per call), in plan order."""
    groups: dict[tuple[float, int], list[plans.ImageSpec]] = {}
    for s in specs:
        groups.setdefault((s.guidance_scale, s.num_inference_steps), []).append(s)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def save_image(image, path: Path, row: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key in ("text", "seed", "guidance_scale", "num_inference_steps", "scheduler", "model", "source", "strength"):
        info.add_text(key, str(row[key]))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def invalid_reason(pixels, image) -> str:
    """Why a sampled image must not be listed as valid ('' when it may be): a nan or inf (a nan LoRA scale, an
    overflowing guidance, a diverged model) converts to black pixels, and an image of one colour shows no lesion.
    ``pixels`` are the pipeline's floats in [0, 1], ``image`` their 8-bit conversion."""
    import numpy as np

    if not np.isfinite(pixels).all():
        return "nan or inf in the sampled pixels"
    rgb = np.asarray(image)
    return "every pixel has one colour" if (rgb == rgb[0, 0]).all() else ""


def save_batch(
    batch, prompts, negatives, images, cfg: GenerateConfig, root: Path, manifest: Manifest, on_saved, bar, inputs
) -> None:
    """Write a batch's images, each followed by its manifest row, in plan order (then ``on_saved``); an edit's
    kept lesion is pasted back first (``edit.paste_back``) and measured into its row."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    pil = [VaeImageProcessor.numpy_to_pil(np.nan_to_num(p)[None])[0] for p in images]  # the pipeline's own conversion
    reasons = [invalid_reason(p, image) for p, image in zip(images, pil, strict=True)]
    measures = [{}] * len(batch)
    if inputs:
        from .edit import paste_back

        pil, measures = paste_back(pil, inputs)
    for spec, prompt, negative, image, reason, measured in zip(
        batch, prompts, negatives, pil, reasons, measures, strict=True
    ):
        row = manifest_row(spec, cfg, prompt, negative) | measured
        row.update(valid=str(not reason).lower(), invalid_reason=reason)
        path = root / row["file_name"]
        save_image(image, path, row)
        manifest.append(row)
        bar.update(1)
        if on_saved is not None:
            on_saved(spec, path)


class MetadataSync:
    """Keeps ``metadata.jsonl`` beside the images, rewritten whole from the manifest: at the start and the end
    (``force``), after the first batch, then after a batch when ``METADATA_EVERY_S`` has passed. Between rewrites it
    lags the manifest but lists only images on disk, and imagefolder reads only the images it lists, so a killed run
    still loads as the images listed so far."""

    def __init__(self, manifest: Manifest, enabled: bool) -> None:
        self.manifest, self.enabled, self.due = manifest, enabled, 0.0

    def __call__(self, force: bool = False) -> None:
        if not self.enabled or not (force or time.monotonic() >= self.due):
            return
        start = time.monotonic()
        self.manifest.write_metadata()
        if not force:
            self.due = time.monotonic() + max(METADATA_EVERY_S, 20 * (time.monotonic() - start))


def contact_sheet(root: Path, rows: list[dict], per_condition: int, out: Path) -> Path | None:
    """One labelled row per condition (its name and count, then its first images by index) for a quick look."""
    by_dx: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: int(r["index"])):
        by_dx.setdefault(r["dx"], []).append(r)
    bands = [dx for dx in labels.CODES if dx in by_dx]
    if not bands or per_condition < 1:
        return None
    cells = [
        open_rgb(root / by_dx[dx][i]["file_name"]) if i < len(by_dx[dx]) else None
        for dx in bands
        for i in range(per_condition)
    ]
    thumb = min(max(next(c for c in cells if c is not None).size), 128)
    names = [f"{labels.BY_CODE[dx].name} ({len(by_dx[dx])})" for dx in bands]
    sheet = image_grid(cells, cols=per_condition, tile=thumb, row_labels=names, fill=(255, 255, 255))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def generate(
    cfg: GenerateConfig,
    pipe=None,
    processes: Processes | None = None,
    on_saved: Callable[[plans.ImageSpec, Path], None] | None = None,
) -> GenerateResult:
    """Make every planned image that is not already on disk, appending its manifest row once it is in place.

    ``pipe`` reuses a loaded pipeline (tests, benchmarks; ``--torch_compile`` replaces its UNet with the compiled
    one); ``processes`` overrides accelerate's layout; ``on_saved`` is called, in the writer thread, after each
    image and its row are written.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    processes = processes or accelerate_processes()
    planning = cfg.planned_images * plans.PLAN_SECONDS_PER_IMAGE
    if processes.is_main and planning > 5:  # a large plan takes a while to build: say so first
        print(f"planning {cfg.planned_images:,} images (about {plans.duration(planning)})")
    plan = make_plan(cfg)
    summary = plans.summarize_plan(plan)
    if processes.is_main and cfg.mode == "dataset":
        target = cfg.read_target()
        print("\n".join([*plans.describe_plan(summary), *(target.describe() if target else [])]))
    root = Path(cfg.output_dir) / ("single" if cfg.mode == "single" else "")
    check_writable(root)
    manifest = Manifest(root / "manifest.csv")
    mine = plans.shard(plan, processes.index, processes.count)
    if cfg.mode != "single":
        check_resume(root, cfg)  # every process checks before any writes, so a refusal stops them all
    processes.wait()
    if processes.is_main:
        # a SIGKILL skips atomic_path's cleanup; its hidden temporaries are never listed, so remove them
        # (only where generate writes: --output_dir may be a folder that holds other work)
        for stale in [*root.glob(".*.tmp"), *root.glob("*/.*.tmp"), *root.glob("dataset/*/.*.tmp")]:
            stale.unlink()
        # single mode regenerates its images: a rerun with new flags must not keep an old image under the same seed
        manifest.repair(root, drop={file_name(s, cfg.mode) for s in plan} if cfg.mode == "single" else set())
    sync_metadata = MetadataSync(manifest, processes.is_main and cfg.mode == "dataset")
    sync_metadata(force=True)  # a resumed folder lists exactly the images the repaired manifest keeps
    processes.wait()
    done = {r["file_name"] for r in manifest.read()}
    todo = [s for s in mine if file_name(s, cfg.mode) not in done]
    if todo and pipe is None:
        pipe = load_model(cfg, resolve_device(cfg.device))
    elif todo:
        set_scheduler(pipe, cfg.scheduler, model_scheduler_config(cfg))
    if processes.is_main:  # only once the model loaded: a failed load leaves no settings a rerun is held to
        write_json(
            root / "generation_config.json",
            {
                "settings": settings(cfg),
                "model": model_identity(cfg.model_path, cfg.base_model),
                "config": asdict(cfg),
                "plan": summary,
            },
        )
    processes.wait()

    if todo:
        editor = None
        if cfg.mode in IMAGE_MODES:
            from .edit import Editor

            editor = Editor(pipe, cfg)
            pipe = editor.pipe
        lora = bool(getattr(pipe, "get_active_adapters", lambda: [])())
        field = prompt_field(cfg)
        partners = plans.pair_partners(plan) if cfg.contrast_guidance else {}
        bar = tqdm(
            total=len(todo),
            unit="img",
            desc=f"generating ({cfg.scheduler})",
            disable=None if processes.is_main else True,
        )
        work = sum(s.num_inference_steps for s in todo)
        compiled, why = compile_choice(
            cfg.torch_compile, work, COMPILE_AFTER_DENOISING_STEPS, "denoising steps", pipe.device
        )
        if compiled:
            compile_denoiser(pipe)
            if processes.is_main:
                print(f"compiling the denoiser ({why})")
        # A 512 px PNG takes about 70 ms of CPU to encode (measured here), the order of a GPU's time per image,
        # so one writer thread saves batch k while batch k+1 samples; its errors (and on_saved's) surface here.
        fitting = FittingBatches(cfg.batch_size)
        with ThreadPoolExecutor(max_workers=1) as writer:
            saving = None
            for batch in batches(todo, cfg.batch_size):
                batch, inputs = editor.load(batch) if editor else (batch, None)  # a bad source: one line, skipped
                if not batch:
                    continue
                prompts = [s.text or build_prompt(s.record(), cfg.caption_style, cfg.seed, field) for s in batch]
                negatives = [negative_prompt(s, cfg, partners, field) for s in batch]
                seeds = [s.seed for s in batch]
                guidance, steps = batch[0].guidance_scale, batch[0].num_inference_steps
                images = fitting.sample(pipe, prompts, negatives, seeds, guidance, steps, cfg, lora, inputs=inputs)
                if saving is not None:
                    saving.result()
                    sync_metadata()
                saving = writer.submit(
                    save_batch, batch, prompts, negatives, images, cfg, root, manifest, on_saved, bar, inputs
                )
            if saving is not None:
                saving.result()
        bar.close()
        if editor:
            editor.report()
    processes.wait()

    sync_metadata(force=True)
    sheet = None
    if processes.is_main and cfg.contact_sheet > 0:
        sheet = contact_sheet(root, manifest.read(), cfg.contact_sheet, root / "contact_sheet.png")
    result = GenerateResult(
        root, manifest.path, len(plan), len(todo), len(mine) - len(todo), time.perf_counter() - start, sheet
    )
    if processes.count > 1:
        print(
            f"process {processes.index}/{processes.count}: generated {result.generated}, {result.already_done} already on disk"
        )
    if processes.is_main:
        print_summary(result, cfg)
    return result


def print_summary(result: GenerateResult, cfg: GenerateConfig) -> None:
    rate = result.generated / result.seconds if result.seconds > 0 else 0.0
    print(
        f"generated {result.generated} image(s) in {result.seconds:.1f} s ({rate:.2f} img/s); {result.already_done} already on disk"
    )
    if cfg.mode in IMAGE_MODES:
        size = f"from the images in {cfg.data_dir}"
    elif cfg.total_images is None:
        size = f"{cfg.images_per_condition} per condition"
    else:
        size = f"{cfg.total_images} in all"
    print(f"{result.planned} planned ({size}); manifest: {result.manifest}")
    if result.contact_sheet:
        print(f"contact sheet: {result.contact_sheet}")
    invalid = [r for r in Manifest(result.manifest).read() if r["valid"] == "false"]
    if invalid:
        print(
            f"{len(invalid)} image(s) invalid ({invalid[0]['invalid_reason']}, e.g. {invalid[0]['file_name']}): kept "
            "with valid=false in the manifest, left out of exports and of classifier and evaluation sets; check "
            "--guidance_scale, --lora_scale and the model"
        )


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        generate,
        GenerateConfig,
        argv,
        "generate.py",
        "generate.py",
        ("model_path", "base_model", "distribution", "target"),
    )


if __name__ == "__main__":
    sys.exit(main())
