"""The paper's experiment on real Derm7pt: do concept captions beat label captions for synthetic training data?

For each caption style (label-only, concept): build captions, train the diffusion model on the train split,
generate a class-balanced synthetic set the size of the real train split, train classifiers on real / synthetic
/ mixed images (real + two variants of each real training image with the lesion kept and the skin redrawn in a
drawn tone, by default; ``--anchored_variants 0`` mixes in the synthetic set), score them on the validation
split (balanced accuracy, macro-F1, worst-group accuracy by sex and by body site) and measure the synthetic set
(FID/KID in the feature space of the real-only classifier; how often a concept probe fires when the caption asks
for the concept versus when it states its absence). Each seed is a full replicate in <out>/seed-N with its own
results.json; the table shows mean ± std over seeds, and <out>/results.json holds it all.

    .venv/bin/python experiments/paper_experiment.py --out outputs/paper_experiment [--scale 1] [--seeds 0 1]

``--scale`` multiplies every training length (VAE, UNet, classifier; ``BASE`` at 1, near the TOOLCHAIN.md
prototype) so the same script runs a plumbing check (0.01, as the tests run it), a CPU experiment (1: about
51 min a seed on one core of a 2-core CPU; the README has the measured table) or, on a GPU, a full-size one,
e.g. with real Stable Diffusion weights:

    python experiments/paper_experiment.py --scale 20 --resolution 256 --device cuda \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5   # LoRA on the real model
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lesiongen.captions.build import BuildCaptionsConfig, build
from lesiongen.classify.compare import (
    RUN_NAMES,
    CompareConfig,
    compare,
    differences,
    differences_markdown,
    interval_note,
    markdown,
    recipe_from_pairs,
)
from lesiongen.classify.compare import summarise as summarise_rows
from lesiongen.classify.models import LAST
from lesiongen.cli import option, run_stage
from lesiongen.devices import AUTO
from lesiongen.diffusion.checkpoints import latest_checkpoint
from lesiongen.diffusion.generate import GenerateConfig, generate, settings
from lesiongen.diffusion.tiny import SMALL_DATA_SHAPE, build_tiny_pipeline
from lesiongen.diffusion.train import TrainConfig
from lesiongen.diffusion.train import train as train_diffusion
from lesiongen.diffusion.train_vae import SMALL_DATA_VAE, TrainVAEConfig, train_vae
from lesiongen.errors import InputError
from lesiongen.evaluate.run import EvaluateConfig, evaluate
from lesiongen.files import write_json
from lesiongen.labels import SKIN_TONE_NAMES
from lesiongen.tables import read_image_table

REPO = Path(__file__).resolve().parents[1]
WORST_GROUP_FIELDS = ("sex", "site_group")
# The switch whose paired effect the table reports: the blue-whitish veil has a calibrated pixel descriptor
# (blue-gray share, AUC 0.82 against Derm7pt experts) besides the probe. Label captions never mention
# concepts, so only concept captions get steering pairs.
VEIL = "blue_whitish_veil=present:absent"
SUMMARY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("balanced_accuracy", "balanced acc."),
    ("macro_f1", "macro-F1"),
    ("worst_sex", "worst sex acc."),
    ("worst_site_group", "worst site acc."),
    ("fid", "FID ({space})"),
    ("kid", "KID ({space})"),
    ("recognisability", "recognised (bal. acc.)"),
    ("recognisability_ratio", "recognisability ratio"),
    ("veil_effect", "veil effect (probe, paired)"),
    ("veil_blue_gray", "veil effect (blue-gray %, paired)"),
)
SUMMARY_METRICS = tuple(key for key, _ in SUMMARY_COLUMNS)
MIN_GROUP = 10  # validation subgroups smaller than this are listed but not ranked (too noisy to be "worst")

# Training lengths at --scale 1, sized for a 2-core CPU at 64 px (TOOLCHAIN.md: ~0.1 s per batch-4 step).
# The VAE trains on half-size random crops: a quarter of the cost per step, and it measured a lower colour
# error (6.3 vs 8.2 on 0-255) than full images for the same time on Derm7pt.
MODEL_PATHS = ("model_path", "base_model")  # where the models lie, not which: a moved output folder moves them
BASE = {"vae_steps": 3000, "unet_steps": 1500, "classifier_epochs": 15}
FINISHED = "finished.json"  # written in a generated set once its whole plan ran, with the manifest's row count


@dataclass
class PaperConfig:
    """Run the label-vs-concept caption experiment end to end on real Derm7pt."""

    output_dir: str = option(
        "outputs/paper_experiment", help="working folder (captions, models, images, results)", aliases=("--out",)
    )
    data: str = option(
        os.environ.get("LESIONGEN_DATA", str(REPO.parent / "shared" / "data")), help="folder holding d7p/"
    )
    scale: float = option(1.0, help="multiplies VAE, UNet and classifier training lengths")
    resolution: int = option(64, help="image size for the diffusion model and the classifiers")
    styles: list[str] = option(["label", "concept"], help="caption styles to compare", choices=("label", "concept"))
    pretrained_model_name_or_path: str | None = option(
        None, help="a Stable Diffusion model (hub id or dir) to fine-tune with LoRA; default: build the tiny model"
    )
    model_size: str = option("tiny", help="shape of the built model when none is given", choices=("tiny", "sd1"))
    synthetic_per_class: int | None = option(
        None, help="images per condition (default: --synthetic_ratio x real train size / classes)"
    )
    synthetic_ratio: float = option(1.0, help="synthetic images per real training image, when no --synthetic_per_class")
    num_inference_steps: int = option(25, help="sampling steps")
    guidance_scale: float = option(
        3.0,
        help="classifier-free guidance of the synthetic sets (1.5 gave synthetic-only 0.363 and 0.260 of balanced "
        "accuracy on seeds 0 and 1, against 0.295 and 0.288 at 3: no consistent gain; docs/results.md)",
    )
    steering_guidance_scale: float = option(
        3.0, help="classifier-free guidance of the steering pairs, which must show the one switch they differ in"
    )
    pretrained: bool = option(
        True, help="classifiers start from ImageNet weights, as the original's did; false: from random weights"
    )
    features: list[str] = option(["domain"], help="feature spaces for FID/KID", choices=("domain", "inception"))
    device: str = option(AUTO, help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    seeds: list[int] = option(
        [0], help="one full replicate per seed, in <out>/seed-N; the table shows mean ± std", aliases=("--seed",)
    )
    contrasts: list[str] = option(
        ["blue_whitish_veil", "pigment_network"],
        help="switches of the concept style's steering pairs (generate.py --contrast)",
    )
    pairs_per_class: int = option(10, help="steering pairs per condition and switch")
    anchored_variants: int = option(
        2,
        help="variants of each real training image (generate.py --mode augment, SDEdit from the image) that the "
        "real + synthetic classifiers mix in instead of the text-to-image set; 0: the text-to-image set (2 "
        "lesion-kept skin-tone variants scored above it on each of Derm7pt's seeds 0-4, docs/results.md)",
    )
    anchored_strength: float = option(0.5, help="SDEdit strength of the anchored variants, in (0, 1]")
    anchored_skin_tones: list[str] = option(
        list(SKIN_TONE_NAMES),
        help="anchored variants keep the lesion's pixels (generate.py --keep lesion) and put it on skin of a tone "
        "drawn from these for each variant (--variant_skin_tones); none: the whole image redrawn",
        choices=(*SKIN_TONE_NAMES, "none"),
    )
    tone_augment: float = option(
        0.0,
        help="every classifier's images recoloured to a drawn skin tone with this probability (classifier.py "
        "--tone_augment, no model): the real-only yardstick's counterpart of --anchored_skin_tones",
    )
    mixing: list[str] = option(
        [],
        help="mixing recipe of the real + synthetic classifiers as classifier.py name=value pairs, e.g. "
        "synthetic_share=0.3 share_per=batch synthetic_weight=0.5 finetune_epochs=5 synthetic_bn=true "
        "(finetune_epochs is not scaled; real only then trains as many epochs in all); default: every synthetic "
        "image added once",
    )

    def __post_init__(self) -> None:
        if not self.synthetic_ratio > 0:
            raise InputError("--synthetic_ratio", f"{self.synthetic_ratio} is not positive", "use e.g. 1 or 2")
        if self.anchored_variants < 0:
            raise InputError("--anchored_variants", f"{self.anchored_variants} is negative", "e.g. 1 (0: none)")
        if not 0 < self.anchored_strength <= 1:
            raise InputError("--anchored_strength", f"{self.anchored_strength} is outside (0, 1]", "e.g. 0.5")
        if "none" in self.anchored_skin_tones:
            if len(self.anchored_skin_tones) > 1:
                raise InputError("--anchored_skin_tones", "'none' goes alone", "pass none, or tone names")
            self.anchored_skin_tones = []
        recipe_from_pairs(self.mixing)


@contextmanager
def stage(times: dict, name: str):
    start = time.time()
    print(f"--- {name}", flush=True)
    yield
    times[name] = round(time.time() - start, 1)
    print(f"--- {name}: {times[name]} s", flush=True)


def scaled(key: str, scale: float) -> int:
    return max(1, round(BASE[key] * scale))


def build_base_model(cfg: PaperConfig, seed: int, out: Path, images: Path, times: dict) -> tuple[str, str]:
    """The model every caption style starts from, and the training mode that suits it."""
    if cfg.pretrained_model_name_or_path:
        return cfg.pretrained_model_name_or_path, "lora"
    base = out / "base-model"
    if not (base / "model_index.json").is_file():
        with stage(times, "build tiny model + train its VAE"):
            # The demo's small-data recipe (docs/results.md): its model shape and VAE loss.
            build_tiny_pipeline(base, resolution=cfg.resolution, seed=seed, size=cfg.model_size, **SMALL_DATA_SHAPE)
            # Random VAE weights reconstruct nothing (TOOLCHAIN.md): train it on the real train images first.
            steps = scaled("vae_steps", cfg.scale)
            train_vae(
                TrainVAEConfig(
                    pretrained_model_name_or_path=str(base),
                    train_data_dir=str(images),
                    resolution=cfg.resolution,
                    max_train_steps=steps,
                    crop_size=cfg.resolution // 2,
                    full_size_steps=round(0.15 * steps),  # the demo's 150 of 1000
                    **SMALL_DATA_VAE,
                    seed=seed,
                )
            )
    return str(base), "full"


def finished_generation(folder: Path, expected: int, gc: GenerateConfig) -> bool:
    """A complete set made under ``gc``'s plan settings is reused as is, even if its folder moved: unlike
    generate's own resume check, the model's path may differ. One made under other settings (say, another
    guidance) is refused: the classifiers and the evaluation computed from it would be reused too, and the
    table would mix settings."""
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        return False
    made = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))["settings"]
    asked = json.loads(json.dumps(settings(gc)))
    diffs = [f"{k}: {made.get(k)!r} -> {v!r}" for k, v in asked.items() if k not in MODEL_PATHS and made.get(k) != v]
    if diffs:
        raise InputError(
            folder,
            f"was generated with other settings ({'; '.join(diffs)})",
            "pass a new --output_dir, or delete this folder and the classifiers/ and evaluation/ folders of its style",
        )
    rows = manifest_rows(manifest)
    record = folder / FINISHED
    if record.is_file():  # the plan ran to its end here: sources it had to skip are not missing images
        return json.loads(record.read_text(encoding="utf-8"))["rows"] == rows
    return rows == expected


def manifest_rows(manifest: Path) -> int:
    """Every image a generation made, invalid ones included (they are part of a finished plan)."""
    with open(manifest, newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))


def generated_set(times: dict, name: str, folder: Path, expected: int, gc: GenerateConfig) -> None:
    """``gc``'s set, generated unless finished, then recorded as finished: a lesion too large to keep skips its
    source's variants, so an anchored set can hold fewer than ``expected`` rows and still be complete."""
    if finished_generation(folder, expected, gc):
        return
    with stage(times, name):
        generate(gc)
    write_json(folder / FINISHED, {"rows": manifest_rows(folder / "manifest.csv")})


def condition_counts(data_dir: Path) -> dict[str, int]:
    return read_image_table(data_dir, split="train")["label"].value_counts().to_dict()


def classifier_rows(
    cfg: PaperConfig,
    seed: int,
    data_dir: Path,
    runs: list[str],
    synthetic: Path | None,
    out: Path,
    times: dict,
    name: str,
) -> list[dict]:
    """The classifier comparison for these training sets, scored on validation at each run's last epoch.

    Derm7pt's test images are withheld, so validation is the only real held-out split: scoring the epoch
    that was best on it would select on the test data. Every run trains a fixed number of epochs instead.
    A finished run is not retrained (it resumes from its last epoch), so only new work is timed.
    """
    compare_cfg = CompareConfig(
        data_dir=str(data_dir),
        synthetic_dir=str(synthetic) if synthetic else None,
        output_dir=str(out),
        runs=runs,
        seeds=[seed],
        eval_split="validation",
        checkpoint="last",
        min_group_size=MIN_GROUP,
        pretrained=cfg.pretrained,
        image_size=cfg.resolution,
        epochs=scaled("classifier_epochs", cfg.scale),
        num_workers=0,
        device=cfg.device,
        tone_augment=cfg.tone_augment,
        **recipe_from_pairs(cfg.mixing),
    )
    finished = all((out / f"{mode}-seed{seed}" / "summary.json").is_file() for mode in runs)
    if finished:
        return compare(compare_cfg)["runs"]
    with stage(times, name):
        return compare(compare_cfg)["runs"]


def trained(model_dir: Path) -> bool:
    return (model_dir / "model_index.json").is_file() or (model_dir / "pytorch_lora_weights.safetensors").is_file()


def train_model(cfg: PaperConfig, seed: int, base: str, mode: str, train_dir: Path, model_dir: Path) -> None:
    steps = scaled("unet_steps", cfg.scale)
    train_diffusion(
        TrainConfig(
            pretrained_model_name_or_path=base,
            mode=mode,
            train_text_encoder=mode == "full",  # a random text encoder cannot carry concepts (TOOLCHAIN.md)
            freeze_token_embedding=mode == "full",  # random token vectors are distinct; updating them was slow
            balance_classes=True,
            # The demo's recipe (docs/results.md): the saved weights an average over the last steps, and each
            # concept-caption part after the diagnosis left out of a step with probability 0.3, so the diagnosis
            # draws its condition alone (label captions have one part; the frozen text encoder of a LoRA run has
            # its captions cached, so there it stays off).
            use_ema=True,
            tag_dropout=0.3 if mode == "full" else 0.0,
            snr_gamma=None,  # min-SNR weights the zero-SNR steps that draw the layout near 0 (docs/results.md)
            train_data_dir=str(train_dir),
            caption_dropout=0.1,  # unconditional steps for classifier-free guidance
            resolution=cfg.resolution,
            train_batch_size=16,
            gradient_accumulation_steps=1,
            max_train_steps=steps,
            learning_rate=1e-4 if mode == "lora" else 5e-4,
            lr_scheduler="cosine",
            lr_warmup_steps=min(50, steps // 10),
            output_dir=str(model_dir),
            checkpointing_steps=max(steps // 2, 1),
            checkpoints_total_limit=1,
            validation_steps=0,
            report_to="none",
            seed=seed,
            resume_from_checkpoint="latest" if latest_checkpoint(model_dir) else None,
        )
    )


def replicate(cfg: PaperConfig, seed: int, out: Path) -> dict:
    """One full run of the experiment with one seed; every stage resumes from what ``out`` already holds.

    Stage times are those of the run that did the work: a resumed run keeps the times it finds.
    """
    earlier = out / "results.json"
    times: dict[str, float] = json.loads(earlier.read_text())["seconds"] if earlier.is_file() else {}
    d7p = Path(cfg.data) / "d7p"
    data = {}
    for style in cfg.styles:
        data[style] = out / "data" / style
        if (data[style] / "summary.json").is_file():
            continue  # finished by an earlier run (every stage resumes, so a killed run can be restarted)
        with stage(times, f"captions ({style})"):
            build(
                BuildCaptionsConfig(
                    dataset="d7p",
                    metadata=str(d7p / "meta" / "meta.csv"),
                    images=str(d7p / "images"),
                    output_dir=str(data[style]),
                    style=style,
                    seed=seed,
                    skip_bad_rows=True,
                )
            )
    first = data[cfg.styles[0]]
    base, mode = build_base_model(cfg, seed, out, first / "train", times)

    real_dir = out / "classifiers" / "real"
    rows = [
        {"captions": "-", **r}
        for r in classifier_rows(cfg, seed, first, ["real"], None, real_dir, times, "classifier (real only)")
    ]

    counts = condition_counts(first)
    per_class = cfg.synthetic_per_class or max(1, round(cfg.synthetic_ratio * sum(counts.values()) / len(counts)))
    evaluations = {}
    for style in cfg.styles:
        model_dir = out / "models" / style
        if not trained(model_dir):
            with stage(times, f"diffusion training ({style})"):
                train_model(cfg, seed, base, mode, data[style] / "train", model_dir)
        synthetic = out / "synthetic" / style
        sampled = sampling(cfg, seed, base, mode, model_dir, style, counts, synthetic, per_class)
        generated_set(times, f"generation ({style})", synthetic, per_class * len(counts), sampled)
        pairs = out / "pairs" / style if style == "concept" and cfg.contrasts else None
        if pairs is not None:
            paired = sampling(
                cfg, seed, base, mode, model_dir, style, counts, pairs, cfg.pairs_per_class, cfg.contrasts
            )
            expected = 2 * len(cfg.contrasts) * cfg.pairs_per_class * len(counts)
            generated_set(times, f"steering pairs ({style})", pairs, expected, paired)
        mixed_with = synthetic
        if cfg.anchored_variants:
            mixed_with = out / "anchored" / anchored_name(cfg, style)
            anchoring = anchored(cfg, seed, base, mode, model_dir, style, data[style], counts, mixed_with)
            expected = cfg.anchored_variants * sum(counts.values())
            generated_set(times, f"anchored variants ({style})", mixed_with, expected, anchoring)
        trained_dir = out / "classifiers" / style
        for runs, synthetic_set in ((["synthetic"], synthetic), (["mixed"], mixed_with)):
            name = f"classifier ({runs[0]}; {style})"
            rows += [
                {"captions": style, **r}
                for r in classifier_rows(cfg, seed, data[style], runs, synthetic_set, trained_dir, times, name)
            ]
        previous = out / "evaluation" / style / "evaluation.json"
        if previous.is_file():
            evaluations[style] = json.loads(previous.read_text())
            continue
        with stage(times, f"evaluation ({style})"):
            evaluations[style] = evaluate(
                EvaluateConfig(
                    real=str(data[style]),
                    synthetic=str(synthetic / "manifest.csv"),
                    output_dir=str(out / "evaluation" / style),
                    features=cfg.features,
                    classifier=str(real_dir / f"real-seed{seed}" / LAST),
                    heldout_split="validation",
                    pairs=str(pairs / "manifest.csv") if pairs is not None else None,
                    device=cfg.device,
                    seed=seed,
                )
            )
    result = {
        "seed": seed,
        "synthetic_per_class": per_class,
        "recognisability_difference": recognisability_difference(out, cfg.styles, seed),
        "rows": rows,
        "fidelity": {style: fidelity_row(e) for style, e in evaluations.items()},
        "seconds": times,
    }
    write_json(out / "results.json", result)
    return result


def sampling(cfg, seed, base, mode, model_dir, style, counts, out, per_class, contrast=()) -> GenerateConfig:
    """The generation settings of a style's synthetic set and of its steering pairs (the same sampler)."""
    return GenerateConfig(
        condition=",".join(sorted(counts)),
        mode="dataset",
        num_images=per_class,
        output_dir=str(out),
        model_path=str(model_dir),
        base_model=base if mode == "lora" else None,
        device=cfg.device,
        guidance_scale=[cfg.steering_guidance_scale if contrast else cfg.guidance_scale],
        num_inference_steps=[cfg.num_inference_steps],
        batch_size=32,
        caption_style=style,
        resolution=cfg.resolution,
        contrast=list(contrast),
        contrast_guidance=bool(contrast),  # each side sampled against the other's prompt, as the demo's pairs
        contact_sheet=0 if contrast else 8,
        seed=seed,
    )


def anchored_name(cfg: PaperConfig, style: str) -> str:
    """The folder of one kind of anchored variants, so that recipes asking for other kinds never share one."""
    tones = "-".join(t.replace(" ", "") for t in cfg.anchored_skin_tones)
    return f"{style}-{cfg.anchored_variants}x-strength{cfg.anchored_strength:g}" + (f"-keep-{tones}" if tones else "")


def anchored(cfg, seed, base, mode, model_dir, style, data_dir, counts, out) -> GenerateConfig:
    """The anchored variants: each real training image redrawn by the fine-tuned model from its own noised
    latents (SDEdit), with its own labels and a fresh phrasing of its caption."""
    return GenerateConfig(
        condition=",".join(sorted(counts)),  # the classifier's classes, as the text-to-image set
        mode="augment",
        data_dir=str(Path(data_dir).resolve()),  # as recorded: the same set for every recipe that links this seed
        split="train",
        variants_per_image=cfg.anchored_variants,
        strength=cfg.anchored_strength,
        keep="lesion" if cfg.anchored_skin_tones else None,
        variant_skin_tones=cfg.anchored_skin_tones,
        output_dir=str(out),
        model_path=str(model_dir),
        base_model=base if mode == "lora" else None,
        device=cfg.device,
        guidance_scale=[cfg.guidance_scale],
        num_inference_steps=[cfg.num_inference_steps],
        batch_size=32,
        caption_style=style,
        resolution=cfg.resolution,
        contact_sheet=8,
        seed=seed,
    )


def fidelity_row(evaluation: dict) -> dict:
    """Per feature space: the set metrics, memorisation, recognisability and the veil's paired effects."""
    rec = evaluation.get("recognisability", {})
    veil = evaluation.get("paired_descriptors", {}).get(VEIL, {})
    out = {}
    for space, r in evaluation["spaces"].items():
        overall = r["overall"]
        out[space] = {k: overall.get(k) for k in ("fid", "kid", "precision", "recall", "coverage")}
        out[space]["flagged_copies"] = r["memorisation"]["flagged"]
        probe = r.get("paired_probe", {}).get(VEIL, {})
        out[space].update(
            recognisability=rec.get("balanced_accuracy"),
            recognisability_ratio=rec.get("ratio"),
            min_recall=rec.get("min_recall"),
            veil_effect=probe.get("mean"),
            veil_effect_interval=[probe.get("low"), probe.get("high")],
            veil_blue_gray=veil.get("mean"),
            veil_blue_gray_interval=[veil.get("low"), veil.get("high")],
        )
    return out


def recognisability_difference(out: Path, styles: list[str], seed: int) -> dict | None:
    """Concept minus label captions: balanced accuracy of the real classifier on each style's generated images,
    with a bootstrap interval that resamples each set's images."""
    import pandas as pd

    from lesiongen.classify.metrics import balanced_accuracy
    from lesiongen.evaluate.faithfulness import bootstrap_difference

    tables = {s: out / "evaluation" / s / "recognisability.csv" for s in ("concept", "label")}
    if not set(tables) <= set(styles) or not all(p.is_file() for p in tables.values()):
        return None
    rows = {s: pd.read_csv(p)[["asked", "predicted"]].to_numpy() for s, p in tables.items()}
    return bootstrap_difference(rows["concept"], rows["label"], lambda r: balanced_accuracy(r[:, 0], r[:, 1]), seed)


def summarise(replicates: list[dict], space: str) -> list[dict]:
    """Mean and std (over seeds) of every metric per (captions, train) row, with its style's fidelity."""
    rows = [
        {"seed": rep["seed"], **row, **rep["fidelity"].get(row["captions"], {}).get(space, {})}
        for rep in replicates
        for row in rep["rows"]
    ]
    return summarise_rows(rows, by=("captions", "train"), metrics=SUMMARY_METRICS)


def against_real(replicates: list[dict], styles: list[str]) -> list[dict]:
    """Each style's synthetic-only and real + synthetic classifiers minus real only, on the same validation
    images and seeds: paired bootstrap intervals over the images and a t-interval over the seeds (compare.py)."""
    rows = [row for rep in replicates for row in rep["rows"]]
    real = [r for r in rows if r["train"] == "real"]
    return [
        d
        for style in styles
        for mode in ("synthetic", "mixed")
        for d in differences(
            [r for r in rows if r["captions"] == style and r["train"] == mode],
            real,
            MIN_GROUP,
            captions=style,
            name=f"{mode}-{style}",
            against=RUN_NAMES["real"],
        )
    ]


def experiment(cfg: PaperConfig) -> dict:
    out = Path(cfg.output_dir)
    replicates = [replicate(cfg, seed, out / f"seed-{seed}") for seed in cfg.seeds]
    result = {
        "config": vars(cfg),
        "machine": machine(),
        "space": cfg.features[0],
        "summary": summarise(replicates, cfg.features[0]),
        "differences": against_real(replicates, cfg.styles),
        "replicates": replicates,
    }
    write_json(out / "results.json", result)
    print(table(result))
    return result


def machine() -> dict:
    import diffusers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def table(result: dict) -> str:
    space, seeds = result["space"], result["config"]["seeds"]
    columns = [(key, title.format(space=space)) for key, title in SUMMARY_COLUMNS]
    lines = [
        f"Derm7pt validation split; seeds {', '.join(map(str, seeds))}" + (" (mean ± std)" if len(seeds) > 1 else ""),
        "",
        markdown(result["summary"], by=(("captions", "captions"), ("train", "train")), metrics=columns, counts=False),
    ]
    if result.get("differences"):
        first = result["differences"][0]
        lines += [interval_note(first["n_images"], first["seeds"]), "", differences_markdown(result["differences"])]
    for rep in result["replicates"]:
        diff = rep.get("recognisability_difference")
        if diff:
            lines.append(
                f"seed {rep['seed']}: recognisability, concept minus label captions {diff['difference']:+.3f} "
                f"[{diff['low']:+.3f}, {diff['high']:+.3f}] (bootstrap 95% interval over generated images)"
            )
        lines.append(f"seed {rep['seed']} stage seconds: " + json.dumps(rep["seconds"]))
    lines.append("machine: " + json.dumps(result["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    prog, reads = "experiments/paper_experiment.py", ("data", "pretrained_model_name_or_path")
    return run_stage(experiment, PaperConfig, argv, prog, "the paper experiment", reads)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
