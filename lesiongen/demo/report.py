"""``report.html`` and ``report.md``: what a run of the pipeline produced, in one page a person can read.

Where the numbers come from (commit, threads, torch and diffusers versions, seed), then a picture first and
numbers beside it: per condition real and generated images side by side with how often a real-trained
classifier recognises the generated ones; fidelity (FID, KID, precision, recall, density, coverage) and
near-copies of training images; for each concept switch, pairs that share seed and prompt (on above, off
below) with the paired effect, said in words; asked vs measured skin tone; the diffusion loss curves; the
classifier comparison with worst-group accuracy; stage times; and the commands that rerun each stage on real
HAM10000 / Derm7pt with real Stable Diffusion weights. A section with nothing to show is left out.

    python -m lesiongen.demo.report --real_data demo_output/captions --synthetic_data demo_output/generated \
        --evaluation demo_output/evaluation --pairs demo_output/pairs \
        --train_runs base=demo_output/model/base lora=demo_output/model/lora \
        --comparison demo_output/classifiers/comparison.json --output_dir demo_output
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import labels
from ..cli import option, parse_config, run
from ..errors import InputError
from ..files import atomic_path, write_text
from ..images import image_grid, open_rgb
from ..page import Figure, Section, to_html, to_markdown

GRID_DIR = "report_files"
COMPARISON_COLUMNS = (
    ("name", "classifier trained on"),
    ("n_train", "training images"),
    ("balanced_accuracy", "balanced accuracy"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("worst_group", "worst group"),
    ("worst_group_accuracy", "worst-group accuracy"),
    ("max_gap", "largest gap"),
)

# The set-to-set metrics of lesiongen.evaluate, with the digits each is read at.
FIDELITY_COLUMNS = (("fid", "FID", 1), ("kid", "KID", 4))
MANIFOLD_COLUMNS = (("precision", "precision"), ("recall", "recall"), ("density", "density"), ("coverage", "coverage"))
PROVENANCE_COLUMNS = (
    ("commit", "commit"),
    ("threads", "torch threads"),
    ("torch", "torch"),
    ("diffusers", "diffusers"),
    ("started", "run started"),
)

# How each stage runs on real data with real weights; the demo runs the same modules with small flags.
RERUN_COMMANDS: tuple[tuple[str, str], ...] = (
    (
        "Captions (HAM10000)",
        "python build_captions.py --dataset ham10000 --metadata data/ham10000/HAM10000_metadata.csv "
        "--images data/ham10000/images --output_dir data/captions/ham10000",
    ),
    (
        "Captions (Derm7pt, official split)",
        "python build_captions.py --dataset d7p --metadata data/d7p/meta/meta.csv --images data/d7p/images "
        "--output_dir data/captions/d7p --skip_bad_rows",
    ),
    (
        "LoRA on Stable Diffusion 1.5",
        "MODEL_NAME=stable-diffusion-v1-5/stable-diffusion-v1-5 TRAIN_DATA_DIR=data/captions/ham10000/train "
        "OUTPUT_DIR=outputs/lesiongen-lora ./train_lora.sh",
    ),
    (
        "Full UNet fine-tuning with EMA",
        "MODEL_NAME=stable-diffusion-v1-5/stable-diffusion-v1-5 TRAIN_DATA_DIR=data/captions/ham10000/train "
        "OUTPUT_DIR=outputs/lesiongen-full ./train_SD.sh",
    ),
    (
        "Balanced synthetic dataset",
        "python generate.py --mode dataset --condition all --num_images 1000 "
        "--model_path outputs/lesiongen-lora --output_dir outputs/generated",
    ),
    (
        "Steering pairs: one switch, same seed and prompt",
        "python generate.py --mode dataset --condition all --num_images 20 --model_path outputs/lesiongen-lora "
        "--contrast blue_whitish_veil streaks=irregular dots_and_globules=irregular skin_tone --contrast_guidance "
        "--output_dir outputs/pairs",
    ),
    (
        "Lesion-kept skin-tone variants of each training image (the real + synthetic classifier's images)",
        "python generate.py --mode augment --data_dir data/captions/ham10000 --split train --model_path "
        "outputs/lesiongen-lora --variants_per_image 2 --strength 0.6 --keep lesion --variant_skin_tones "
        "'very light' light intermediate tan brown dark --output_dir outputs/variants",
    ),
    (
        "Classifiers: real, synthetic, mixed",
        "for t in real synthetic; do python classification/classifier.py --data_dir data/captions/ham10000 "
        "--train $t --synthetic_dir outputs/generated --output_dir weights/$t; done; python "
        "classification/classifier.py --data_dir data/captions/ham10000 --train mixed --synthetic_dir outputs/variants "
        "--output_dir weights/mixed",
    ),
    (
        "Per-subgroup evaluation on the held-out test split",
        "for t in real synthetic mixed; do python classification/eval.py --checkpoint weights/$t "
        "--data_dir data/captions/ham10000 --split test; done",
    ),
    (
        "Faithfulness: recognisability and paired steering",
        "python -m lesiongen.evaluate --real data/captions/ham10000 --synthetic outputs/generated "
        "--classifier weights/real --pairs outputs/pairs --output_dir outputs/evaluation",
    ),
)


@dataclass
class ReportConfig:
    """Write report.html and report.md from a pipeline run's outputs."""

    output_dir: str = option(help="folder for report.html, report.md and report_files/", aliases=("--out",))
    real_data: str = option(help="build_captions.py output folder (real images per condition)")
    synthetic_data: str | None = option(None, help="generate.py output folder (manifest.csv)")
    evaluation: str | None = option(None, help="python -m lesiongen.evaluate output folder (evaluation.json)")
    pairs: str | None = option(None, help="generate.py --contrast output folder (the steering pairs)")
    train_runs: list[str] = option([], help="NAME=DIR of train.py output folders whose loss curves to plot")
    comparison: str | None = option(None, help="comparison.json written by classification/compare.py")
    variants: str | None = option(
        None, help="generate.py --mode augment output folder: per condition one training image and its variants"
    )
    audit: str | None = option(None, help="python -m lesiongen.audit output folder (audit.json)")
    stage_times: str | None = option(None, help="JSON {stage: seconds}")
    run_info: str | None = option(
        None, help="JSON {seed, demo, stages: [{number, title, run: {commit, threads, torch, diffusers, started}}]}"
    )
    images_per_condition: int = option(8, help="images per row of each grid")
    tile: int = option(64, help="grid tile size in pixels")
    title: str = option("LesionGen report", help="page title")

    def __post_init__(self) -> None:
        for run_spec in self.train_runs:
            if "=" not in run_spec:
                raise InputError("--train_runs", f"'{run_spec}' is not NAME=DIR", "e.g. --train_runs lora=outputs/lora")
        if self.images_per_condition < 1 or self.tile < 8:
            raise InputError("--images_per_condition/--tile", "too small", "use at least 1 image and 8 px tiles")
        if self.evaluation and not (Path(self.evaluation) / "evaluation.json").is_file():
            raise InputError(
                f"--evaluation {self.evaluation}",
                "holds no evaluation.json",
                "pass python -m lesiongen.evaluate's folder",
            )


def condition_grid(real: list[str], generated: list[str], n: int, tile: int):
    """Two rows of ``n`` tiles, real above generated; missing tiles stay grey. Size: (n*tile, 2*tile)."""
    cells = [open_rgb(paths[i]) if i < len(paths) else None for paths in (real, generated) for i in range(n)]
    return image_grid(cells, cols=n, tile=tile)


def pick_paths(frame, code: str, n: int) -> list[str]:
    """The first ``n`` images of a condition in file order (deterministic, so reports are comparable)."""
    if frame is None or frame.empty:
        return []
    rows = frame[frame["label"] == code].sort_values("path")
    return rows["path"].tolist()[:n]


def read_loss_log(train_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from a train.py output's TensorBoard logs; empty if it logged nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(Path(train_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "loss" in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars("loss")})
    return sorted(points.items())


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """One panel per run (full training and LoRA differ in scale); a smoothed line over the raw points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.0), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items(), strict=True):
        steps, losses = np.array(points, dtype=float).T
        ax.plot(steps, losses, color="#9ab", lw=0.8, label="per step")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="#135", lw=1.8, label=f"mean of {window}")
        ax.set_title(name)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("diffusion loss (MSE)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def number(value: float, digits: int, plus: bool = False) -> str:
    """``0.109`` (``+0.109`` with ``plus``); a value that rounds to zero is ``0.000``, never ``-0.000``."""
    text = f"{value:+.{digits}f}"
    if float(text) == 0:
        return text[1:]
    return text if plus else text.removeprefix("+")


def effect_words(effect: dict, digits: int = 3) -> str:
    """A paired effect as its mean and 95% interval, then in words: an effect is shown only when the interval,
    as printed, lies on one side of 0, so an interval that rounds to ``[0.000, 0.000]`` shows none."""
    if effect.get("mean") is None:
        return effect.get("note", "not measured")
    mean = number(effect["mean"], digits, plus=True)
    if effect.get("low") is None:
        return f"{mean} (n={effect['n']}, too few pairs for an interval): no effect shown"
    low, high = (round(effect[k], digits) for k in ("low", "high"))
    words = (
        "an effect, the interval above 0"
        if low > 0
        else "an effect, the interval below 0"
        if high < 0
        else "no effect shown, the interval includes 0"
    )
    return f"{mean} [{number(low, digits)}, {number(high, digits)}] (n={effect['n']}): {words}"


def comparison_rows(results: dict) -> list[dict]:
    """One table row per classifier run of a ``comparison.json``."""
    runs = [{**r, "n_train": r["n_real"] + r["n_synthetic"]} for r in results.get("runs", [])]
    return [{key: r.get(key) for key, _ in COMPARISON_COLUMNS} for r in runs]


def save_png(image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def conditions_section(cfg: ReportConfig, real, synthetic, evaluation: dict, files: Path) -> tuple[Section, list]:
    """Per condition, real images above generated ones, captioned with how often the generated are recognised."""
    title = "Does each generated image show its condition?"
    if synthetic is None or synthetic.empty:
        return Section(title), []
    rec = evaluation.get("recognisability")
    grids, figures = [], []
    for cond in labels.CONDITIONS:
        r = pick_paths(real, cond.code, cfg.images_per_condition)
        g = pick_paths(synthetic, cond.code, cfg.images_per_condition)
        path = save_png(condition_grid(r, g, cfg.images_per_condition, cfg.tile), files / f"grid_{cond.code}.png")
        grids.append({"code": cond.code, "name": cond.name, "path": path, "real": len(r), "generated": len(g)})
        recall = rec["recall"].get(cond.code) if rec else None
        said = f"; recognised in {recall:.0%} of its generated images" if recall is not None else ""
        caption = f"{cond.name} ({cond.code}): {len(r)} real (top), {len(g)} generated (bottom){said}"
        figures.append(Figure(caption, path, cfg.images_per_condition * cfg.tile))
    notes = []
    if rec:
        notes.append(
            f"A ResNet18 trained on the real training images names the asked condition of {rec['n']} generated images "
            f"with balanced accuracy {fmt(rec['balanced_accuracy'])} (chance {fmt(rec['chance'])}), against "
            f"{fmt(rec['real_balanced_accuracy'])} on {rec['n_heldout_real']} held-out real images: a ratio of "
            f"{fmt(rec['ratio'])}, where 1.0 means as recognisable as real photographs. The classifier only judges; "
            "it never steers sampling or picks images."
        )
        if "vae_ceiling" in rec:
            c = rec["vae_ceiling"]
            notes.append(
                f"The ceiling: the autoencoder's reconstructions of the same held-out real images are recognised with "
                f"balanced accuracy {fmt(c['balanced_accuracy'])} (ratio {fmt(c['ratio'])}). Nothing generated through "
                "this autoencoder can do better; conditions its reconstructions lose ("
                + (", ".join(code for code, v in c["recall"].items() if not v) or "none")
                + ") cannot be recognised in generated images either."
            )
        confusion = Path(cfg.evaluation) / rec["confusion_png"]
        if confusion.is_file():
            copied = files / confusion.name
            shutil.copy(confusion, copied)
            figures.append(Figure("How the real-trained classifier reads the generated images", copied, 420))
    return Section(title, notes, figures), grids


def pair_grid(frame, table, tile: int, n: int):
    """Up to ``n`` pairs, one per condition in turn: the 'on' images above, the 'off' images below."""
    picked, by_dx = [], {}
    for row in table.itertuples():
        by_dx.setdefault(frame.at[row.on, "label"], []).append(row)
    while len(picked) < n and any(by_dx.values()):
        for rows in by_dx.values():
            if rows and len(picked) < n:
                picked.append(rows.pop(0))
    cells = [open_rgb(frame.at[getattr(r, side), "path"]) for side in ("on", "off") for r in picked]
    return image_grid(cells, cols=len(picked), tile=tile)


def steering_section(cfg: ReportConfig, evaluation: dict, files: Path) -> tuple[Section, list]:
    """For each switch: pairs that share seed and prompt, and the paired effect the evaluation measured."""
    from ..evaluate.faithfulness import pairs as pair_table
    from ..tables import read_image_table

    title = "One switch, same seed and prompt: do concepts and skin tone steer the pixels?"
    if not cfg.pairs:
        return Section(title), []
    frame = read_image_table(cfg.pairs)
    table = pair_table(frame)
    probes = {k: v for space in evaluation.get("spaces", {}).values() for k, v in space.get("paired_probe", {}).items()}
    descriptors = evaluation.get("paired_descriptors", {})
    figures, grids = [], []
    for i, (contrast, group) in enumerate(table.groupby("contrast", sort=False)):
        field, _, values = contrast.partition("=")
        on, _, off = values.partition(":")
        path = save_png(pair_grid(frame, group, cfg.tile, cfg.images_per_condition), files / f"pairs_{i}_{field}.png")
        said = [f"probe {effect_words(probes[contrast])}"] if contrast in probes and "mean" in probes[contrast] else []
        if contrast in descriptors:
            said.append(f"{descriptors[contrast]['descriptor']} {effect_words(descriptors[contrast], 1)}")
        caption = f"{field}: {on} (top) vs {off} (bottom); paired effect " + ("; ".join(said) or "not measured")
        figures.append(Figure(caption, path, cfg.images_per_condition * cfg.tile))
        grids.append({"contrast": contrast, "path": path, "pairs": len(group)})
    note = (
        "Each column is one pair: the same seed, sampler and prompt except for one switch. The paired effect is the mean "
        "difference (top minus bottom) of a measurement, with its bootstrap 95% interval and n, the number of pairs; "
        "an effect is shown only where the interval lies on one side of zero, and 'no effect shown' says that it "
        "does not. 'probe' is a logistic probe trained on the real images' concept labels (its probability that "
        "the concept is present); the analyzer descriptors are blue-gray share, colour variability, red share and "
        "the skin's ITA angle, measured from pixels by lesiongen.captions.analyze."
    )
    return Section(title, [note], figures), grids


def provenance_section(run_info: dict) -> Section:
    """Which code, thread count and library versions computed each stage; stages reused from an earlier run
    keep that run's record, so a page built from several runs says so."""
    groups: dict[str, tuple[dict | None, list[str]]] = {}
    for stage in run_info.get("stages", []):
        groups.setdefault(json.dumps(stage["run"], sort_keys=True), (stage["run"], []))[1].append(stage["number"])
    rows = []
    for record, numbers in groups.values():
        who = "every stage" if len(groups) == 1 else ", ".join(numbers)
        if record is None:
            rows.append([who, "not recorded (an earlier version ran it; --force reruns it)", "", "", "", ""])
        else:
            commit = record["commit"] or "not a git checkout"
            rows.append([who, commit, *(str(record[k]) for k, _ in PROVENANCE_COLUMNS[1:])])
    notes = []
    if "seed" in run_info:
        notes.append(
            f"Seed {run_info['seed']} for the data, the models and every stage ({run_info.get('demo', '')} demo); "
            "stages are numbered as in the stage times below. The torch thread count sets the order of "
            "floating-point sums, so the same seed gives other numbers with another thread count or other library "
            "versions; a stage reused from an earlier run keeps that run's record."
        )
    table = (["stages", *(title for _, title in PROVENANCE_COLUMNS)], rows) if rows else None
    return Section("Where these numbers come from", notes, table=table)


def fidelity_section(cfg: ReportConfig, evaluation: dict, files: Path) -> Section:
    """FID, KID, precision/recall/density/coverage overall and per condition, and near-copies of training
    images, as lesiongen.evaluate measured them in each feature space."""
    headers = ["features", "condition", "real", "generated"]
    headers += [title for _, title, _ in FIDELITY_COLUMNS] + [title for _, title in MANIFOLD_COLUMNS]
    rows, notes, figures = [], [], []
    for space, result in evaluation.get("spaces", {}).items():
        groups = [("all conditions", result["overall"])] + [
            (labels.BY_CODE[code].name if code in labels.BY_CODE else code, m)
            for code, m in result.get("per_condition", {}).items()
        ]
        for group, m in groups:
            cells = [fmt(m.get(key), digits) for key, _, digits in FIDELITY_COLUMNS]
            cells += [fmt(m.get(key)) for key, _ in MANIFOLD_COLUMNS]
            rows.append([space, group, str(m.get("n_real", "")), str(m.get("n_synthetic", "")), *cells])
        memo = result.get("memorisation")
        if memo:
            notes.append(
                f"Near-copies ({space} features): {memo['flagged']} of {result['overall']['n_synthetic']} generated "
                f"images ({memo['share_flagged']:.1%}) lie closer to a real training image than {memo['copy_ratio']} "
                "times that image's distance to its own nearest real neighbour; the median of that ratio is "
                f"{memo['median_ratio']:.2f} (at 1 or more, no closer than the real images are to each other). Each "
                f"generated image's nearest real image is listed in {memo['csv']}."
            )
            closest = [c for c in memo.get("closest", []) if Path(c["synthetic"]).is_file()]
            closest = [c for c in closest if Path(c["nearest_real"]).is_file()]
            if closest:
                grid = condition_grid(
                    [c["nearest_real"] for c in closest], [c["synthetic"] for c in closest], len(closest), cfg.tile
                )
                path = save_png(grid, files / f"closest_{space}.png")
                caption = (
                    f"The {len(closest)} generated images closest to a training image ({space} features): "
                    "the real image above, the generated one below; ratios "
                    + ", ".join(f"{c['ratio']:.2f}" for c in closest)
                )
                figures.append(Figure(caption, path, len(closest) * cfg.tile))
    if rows:
        notes.insert(
            0,
            "How close the generated set lies to the real training images, in each feature space the evaluation "
            "used ('domain': the penultimate layer of the real-only classifier; 'inception': the standard FID "
            "network). FID and KID: lower is closer. Precision and density: how much of the generated set falls "
            "in the real set's k-nearest-neighbour balls; recall and coverage: how much of the real set the "
            "generated one reaches (Naeem et al. 2020). FID grows as sets shrink, so compare sets of equal size, "
            "never with published FIDs over thousands of images.",
        )
    return Section(
        "Fidelity and near-copies of training images", notes, figures, table=(headers, rows) if rows else None
    )


def skin_tone_section(evaluation: dict) -> Section:
    attrs = evaluation.get("attributes", {})
    bands = attrs.get("skin_tone", {})
    rows = [
        [band, str(b["n"]), str(b["n_measured"]), fmt(b["measured_same"]), fmt(b["median_ita"]), fmt(b["ita_error"])]
        for band, b in bands.items()
    ]
    headers = [
        "asked skin tone",
        "images",
        "ITA measured",
        "measured in that band",
        "median ITA",
        "distance to band (deg)",
    ]
    notes = []
    if bands:
        notes.append(
            f"The skin around each generated lesion is measured by its individual typology angle (ITA); overall "
            f"{fmt(attrs.get('skin_tone_agreement'))} of the measured images fall in the asked band, on average "
            f"{fmt(attrs.get('ita_error'))} degrees outside it."
        )
    return Section("Skin tone: asked vs measured", notes, table=(headers, rows) if rows else None)


def build_report(cfg: ReportConfig) -> dict:
    """Write the figures, report.md and a self-contained report.html; returns what went in."""
    from ..tables import read_image_table

    out = Path(cfg.output_dir)
    files = out / GRID_DIR
    files.mkdir(parents=True, exist_ok=True)
    real = read_image_table(cfg.real_data)
    synthetic = read_image_table(cfg.synthetic_data) if cfg.synthetic_data else None
    evaluation = json.loads((Path(cfg.evaluation) / "evaluation.json").read_text()) if cfg.evaluation else {}
    conditions, grids = conditions_section(cfg, real, synthetic, evaluation, files)
    steering, pair_grids = steering_section(cfg, evaluation, files)

    curves = {name: read_loss_log(folder) for name, folder in (s.split("=", 1) for s in cfg.train_runs)}
    loss_png = files / "loss.png"
    losses = Section("Diffusion training loss")
    if plot_losses(curves, loss_png):
        losses.notes.append(_loss_text(curves))
        losses.figures.append(Figure("loss per optimiser step", loss_png))
    results = json.loads(Path(cfg.comparison).read_text()) if cfg.comparison else {"runs": []}
    rows = comparison_rows(results)
    classifiers = Section(
        "Classifiers on held-out real images",
        [_results_note(results)] if rows else [],
        table=([t for _, t in COMPARISON_COLUMNS], [[fmt(r[k]) for k, _ in COMPARISON_COLUMNS] for r in rows])
        if rows
        else None,
    )
    differences = differences_section(results)
    variants = variants_section(cfg, files)
    audited = audit_sections(cfg, files)
    times = json.loads(Path(cfg.stage_times).read_text()) if cfg.stage_times else {}
    run_info = json.loads(Path(cfg.run_info).read_text()) if cfg.run_info else {}
    numbers = {stage["title"]: stage["number"] for stage in run_info.get("stages", [])}
    timing = Section(
        "Stage times",
        table=(["stage", "seconds"], [[f"{numbers.get(k, '')} {k}".strip(), f"{v:.1f}"] for k, v in times.items()])
        if times
        else None,
    )
    rerun = Section("Rerun each stage on real data with real Stable Diffusion weights", commands=list(RERUN_COMMANDS))
    sections = [
        provenance_section(run_info),
        conditions,
        fidelity_section(cfg, evaluation, files),
        steering,
        skin_tone_section(evaluation),
        losses,
        variants,
        classifiers,
        differences,
        *audited,
        timing,
        rerun,
    ]
    write_text(out / "report.md", to_markdown(cfg.title, sections, GRID_DIR))
    intro = "Every image below is embedded in this file; every number comes from the run's own output files."
    write_text(out / "report.html", to_html(cfg.title, sections, intro))
    return {"grids": grids, "pairs": pair_grids, "loss_points": {k: len(v) for k, v in curves.items()}, "rows": rows}


def variants_section(cfg: ReportConfig, files: Path) -> Section:
    """What the real + synthetic classifier adds when it mixes in variants of the real training images: per
    condition the first training image with all its variants valid, then those variants with their drawn tones."""
    from ..classify.mixing import resolved_sources
    from ..tables import read_image_table

    title = "Variants of the real training images (what real + synthetic adds)"
    if not cfg.variants:
        return Section(title)  # nothing to show: left out
    frame = read_image_table(cfg.variants)  # valid rows, each with its file's path
    frame = frame.assign(source=resolved_sources(frame))
    frame = frame[frame["source"] != ""]
    per_source = frame.groupby("source", sort=False)["path"].transform("size")
    complete = frame[per_source == per_source.max()]
    cells, row_labels = [], []
    for code in labels.CODES:
        rows = complete[complete["label"] == code]
        if rows.empty:
            continue
        rows = rows[rows["source"] == rows["source"].iloc[0]]
        cells += [open_rgb(rows["source"].iloc[0]), *map(open_rgb, rows["path"])]
        row_labels.append(f"{code}: real, then {', '.join(rows['skin_tone'])}")
    if not cells:
        return Section(title)
    cols = len(cells) // len(row_labels)
    path = save_png(image_grid(cells, cols=cols, tile=cfg.tile, row_labels=row_labels), files / "variants.png")
    note = (
        f"{len(frame)} variants of {frame['source'].nunique()} real training images, made by generate.py --mode "
        "augment --keep lesion: each keeps its source's lesion pixel for pixel and its labels, and the model redraws "
        "the skin around it in a tone drawn for it. Synthetic only trains on the text-to-image set instead."
    )
    return Section(title, [note], [Figure("each row: a real training image, then its variants", path, cols * cfg.tile)])


def audit_sections(cfg: ReportConfig, files: Path) -> list[Section]:
    """The counterfactual audit's grid, flip chart and numbers (``python -m lesiongen.audit``), when it ran."""
    import shutil

    from ..audit.run import counts_note, per_value_table, summary_table

    if not cfg.audit:
        return []
    folder = Path(cfg.audit)
    result = json.loads((folder / "audit.json").read_text())
    figures = []
    for name, caption in (("audit_grid.png", "each row one test lesion: source, very light, dark (+ valid, x excluded)"),
                          ("audit_flips.png", "prediction flips")):  # fmt: skip
        shutil.copyfile(folder / name, files / name)
        figures.append(Figure(caption, files / name))
    notes = [
        counts_note(result),
        "Each test image is edited to each tone with its lesion kept pixel for pixel (generate.py --mode edit --keep "
        "lesion): the skin around it is recoloured to the tone's ITA and redrawn by the model from there. An edit "
        "counts only where that skin is skin (not noise) and measures near the asked tone.",
    ]
    return [
        Section("Counterfactual skin-tone audit of the real-only classifier", notes, figures, summary_table(result)),
        Section("The audit per skin tone", table=per_value_table(result)),
    ]


def differences_section(results: dict) -> Section:
    """Each training set against real only on the same images: better, worse or no difference shown, from the
    95% interval (compare.py's paired bootstrap), never from the sign."""
    from ..classify.compare import difference_table, interval_note

    rows = results.get("differences", [])
    title = "Does adding synthetic images change the classifier? Differences with 95% intervals"
    if not rows:
        return Section(title)  # nothing to show: left out
    notes = [interval_note(rows[0]["n_images"], rows[0]["seeds"])]
    return Section(title, notes, table=difference_table(rows))


def _loss_text(curves: dict) -> str:
    return "; ".join(
        f"{k}: {len(v)} steps, loss {v[0][1]:.3f} at step {v[0][0]} to {v[-1][1]:.3f} at step {v[-1][0]}"
        for k, v in curves.items()
        if v
    )


def _results_note(results: dict) -> str:
    from ..classify.compare import schedule_note

    return (
        f"ResNet18 from scratch, evaluated on {results['n_eval']} held-out real images (the {results['split']} split, "
        f"{results['checkpoint']} checkpoint of each run); chance (majority class) balanced accuracy "
        f"{results['baseline']['balanced_accuracy']:.3f}. The worst group is taken over sex, age bin, site group and "
        "skin tone, among groups with at least 3 test images. The synthetic-only row is the Classification Accuracy "
        "Score of Ravuri & Vinyals (2019)."
        + (
            f" The real + synthetic row adds the images of {results['mixed_dir']}, not the synthetic-only row's."
            if results.get("mixed_dir")
            else ""
        )
        + (" " + schedule_note(results["runs"]) if results.get("real_schedule") == "steps" else "")
    )


def report(cfg: ReportConfig) -> dict:
    built = build_report(cfg)
    print(
        f"wrote {Path(cfg.output_dir) / 'report.html'} and report.md: {len(built['grids'])} condition grids, "
        f"{len(built['pairs'])} steering grids, {len(built['rows'])} classifier rows"
    )
    return built


def main(argv: list[str] | None = None) -> int:
    return run(lambda: report(parse_config(ReportConfig, argv, prog="python -m lesiongen.demo.report")))


if __name__ == "__main__":
    sys.exit(main())
