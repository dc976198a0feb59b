"""The one real / synthetic / mixed comparison: ``classification/compare.py``, the demo and the paper experiment.

The paper's main result: the same classifier, settings and seeds, trained on each kind of data and
scored on the same real held-out split, overall and on its worst subgroup. Every caller reads the one
result file written here (``comparison.json``), and ``summarise`` / ``markdown`` make the mean ± std
table over seeds here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import labels
from ..cli import option, run_stage
from ..errors import InputError
from ..files import atomic_path, write_json, write_text
from ..tables import METADATA, SPLITS
from .config import MIXING_OPTIONS, ClassifierSettings, ClassifyConfig
from .data import TRAIN_MODES, check_classes, drop_corrupt, load_tables, read_table
from .evaluate import EvalConfig, evaluate
from .metrics import LEVEL, NO_DIFFERENCE, RESAMPLES, majority_baseline, paired_differences
from .mixing import assemble
from .models import BEST, LAST
from .train import steps_per_epoch, train

RESULT_FILE = "comparison.json"
CHECKPOINTS = {"best": BEST, "last": LAST}
# Metrics averaged over seeds, with their table titles.
METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced acc."),
    ("macro_f1", "macro-F1"),
    ("macro_auc", "macro AUC"),
    ("worst_group_accuracy", "worst-group acc."),
    ("max_gap", "best-worst gap"),
)
# The mixing options (config.py) and their single-run values, which the real-only and synthetic-only runs keep.
RECIPE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ClassifierSettings) if f.name in MIXING_OPTIONS}
RECIPE_TYPES = {"synthetic_share": float, "share_per": str, "synthetic_weight": float, "swap_probability": float}
RECIPE_TYPES |= {"finetune_epochs": int, "synthetic_bn": lambda v: {"true": True, "false": False}[v.lower()]}
RECIPE_TYPES |= {"init_from": str}
# --init_from's value for "this comparison's synthetic-only run": the mixed run starts from its last checkpoint (the
# last, so that nothing is chosen on the validation images).
OWN_SYNTHETIC = "synthetic"


def recipe_from_pairs(pairs: Sequence[str], flag: str = "--mixing") -> dict:
    """classifier.py mixing options from ``name=value`` pairs (``synthetic_share=0.3 finetune_epochs=5``), for
    callers that pass a recipe through; the values are checked where the classifier config is built."""
    recipe = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        name = name.strip().removeprefix("--")
        if name not in RECIPE_TYPES or not value:
            raise InputError(
                flag, f"'{pair}' is not name=value of a mixing option", f"names: {', '.join(RECIPE_TYPES)}"
            )
        try:
            recipe[name] = RECIPE_TYPES[name](value)
        except (ValueError, KeyError):
            raise InputError(
                flag, f"'{pair}': {value!r} is not a value of {name}", "e.g. synthetic_share=0.3"
            ) from None
    return recipe


RUN_NAMES = {"real": "real only", "synthetic": "synthetic only", "mixed": "real + synthetic"}
# Differences between training sets get intervals for these, besides the worst group of each subgroup field.
DIFFERENCE_TITLES = {"balanced_accuracy": "balanced acc.", "worst_group_accuracy": "worst-group acc."}
DIFFERENCE_FILE = "compare_differences.csv"
# How long real only trains: the mixed run's epochs, or as many epochs as give it the mixed run's optimiser steps.
REAL_SCHEDULES = ("epochs", "steps")


@dataclass
class CompareConfig(ClassifierSettings):
    """Train real-only, synthetic-only and mixed classifiers with the same settings and compare them.

    The mixing options (--synthetic_share, --synthetic_weight, --swap_probability, --finetune_epochs,
    --synthetic_bn, --init_from) shape the real + synthetic run; real only trains as many epochs as its two stages,
    or (--real_schedule steps) as many optimiser steps. Real only does not get the epochs of the synthetic-only run
    that --init_from synthetic starts from: those are of synthetic images, and only the schedule on real images is
    matched.
    """

    output_dir: str = option(
        "comparison", help="one sub-folder per run, plus comparison.json, compare.csv and compare.md"
    )
    runs: list[str] = option(list(TRAIN_MODES), help="which training sets to compare", choices=TRAIN_MODES)
    seeds: list[int] = option([0], help="one run per seed and training set; the table shows mean and spread")
    eval_split: str | None = option(
        None, help="real split scored in the table (default: test if it has images, else validation)", choices=SPLITS
    )
    checkpoint: str = option(
        "best",
        help="score each run's best-validation epoch, or its last epoch (use last when --eval_split is validation)",
        choices=tuple(CHECKPOINTS),
    )
    min_group_size: int = option(5, help="smaller subgroups cannot be the worst group")
    mixed_dir: str | None = option(
        None,
        help="the synthetic images the real + synthetic runs add, where they are not --synthetic_dir's: e.g. "
        "generate.py --mode augment's variants of the real training images (synthetic only keeps --synthetic_dir)",
    )
    real_schedule: str = option(
        "epochs",
        help="real only trains the mixed run's epochs (both stages), or (steps) as many epochs as give it the mixed "
        "run's optimiser steps: an epoch of real + synthetic images takes more steps than one of the real ones, and "
        "on a small set those extra steps alone can make the difference",
        choices=REAL_SCHEDULES,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.real_schedule == "steps" and not {"real", "mixed"} <= set(self.runs):
            raise InputError(
                "--real_schedule steps", "counts the mixed run's steps for real only", "run both: --runs real mixed"
            )
        if self.real_schedule == "steps" and self.folds > 1:
            raise InputError(
                "--real_schedule steps",
                "each fold's runs would need their own count",
                "use --folds 1, or --real_schedule epochs",
            )
        if self.init_from == OWN_SYNTHETIC and self.folds > 1:
            raise InputError(
                "--init_from synthetic", "each fold would need its own synthetic-only run", "use --folds 1"
            )
        if self.mixed_dir and "mixed" not in self.runs:
            raise InputError("--mixed_dir", "only the mixed runs use it", "add mixed to --runs, or leave it out")
        if ("synthetic" in self.runs or "mixed" in self.runs and not self.mixed_dir) and not self.synthetic_dir:
            raise InputError(
                "--synthetic_dir",
                "synthetic and mixed runs need synthetic images",
                "pass generate.py's output folder, or --runs real",
            )

    def synthetic_set(self, mode: str) -> str | None:
        """The synthetic folder a run of ``mode`` reads: none for real only, --mixed_dir's for mixed if given."""
        if mode == "real":
            return None
        return self.mixed_dir if mode == "mixed" and self.mixed_dir else self.synthetic_dir

    def run_config(self, mode: str, seed: int, real_epochs: int | None = None) -> ClassifyConfig:
        """The classifier config of one run: these settings with its own data, seed and folder.

        The mixing recipe is the real + synthetic run's. Real only trains as many epochs as both of its stages
        (the yardstick gets every epoch the mixed run gets), or ``real_epochs`` where given, and synthetic only
        stays synthetic only: no fine-tuning on real images, no second BatchNorm set that evaluation would never use.
        """
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ClassifierSettings)}
        if mode != "mixed":
            shared.update(RECIPE_DEFAULTS)
            shared["epochs"] = (real_epochs or self.total_epochs) if mode == "real" else self.epochs
        shared["synthetic_dir"] = self.synthetic_set(mode)
        if shared["init_from"] == OWN_SYNTHETIC:
            shared["init_from"] = str(Path(self.output_dir) / f"synthetic-seed{seed}" / LAST)
        out = Path(self.output_dir) / f"{mode}-seed{seed}"
        return ClassifyConfig(**{**shared, "train": mode, "seed": seed, "output_dir": str(out)})


def recipe(cfg: ClassifierSettings) -> dict:
    """The mixing options that differ from a plain mixed run (all synthetic images added once to the real ones)."""
    changed = {k: getattr(cfg, k) for k, v in RECIPE_DEFAULTS.items() if getattr(cfg, k) != v}
    if cfg.synthetic_share is not None:
        changed["share_per"] = cfg.share_per
    return changed


def eval_split(cfg: CompareConfig) -> str:
    if cfg.eval_split:
        return cfg.eval_split
    return "test" if (Path(cfg.data_dir) / "test" / METADATA).is_file() else "validation"


def check_inputs(cfg: CompareConfig, split: str) -> None:
    """Read, decode-check and assemble every run's data before the first run trains, as each run will, so
    whatever would stop a later run (a bad path, no readable synthetic image, a class the synthetic set
    lacks) fails in seconds, not after the real-only runs have trained."""
    loaded, skipped = load_tables(cfg.data_dir, "real", None, cfg.skip_missing)
    real = drop_corrupt(loaded, skipped)
    synthetic = {  # each synthetic folder the runs read, read and decode-checked once
        folder: drop_corrupt({"synthetic": read_table(folder, None, cfg.skip_missing)}, {})["synthetic"]
        for folder in dict.fromkeys(filter(None, map(cfg.synthetic_set, cfg.runs)))
    }
    read_table(cfg.data_dir, split, cfg.skip_missing)
    if cfg.init_from == OWN_SYNTHETIC and "mixed" in cfg.runs and "synthetic" not in cfg.runs:
        for seed in cfg.seeds:  # the synthetic-only runs were trained by an earlier call, as the experiment does
            start = Path(cfg.run_config("mixed", seed).init_from)
            if not start.is_file():
                raise InputError("--init_from synthetic", f"{start} not found", "add synthetic to --runs")
    if cfg.folds == 1:  # folds validate on held-out training lesions, not on the validation split
        for mode, seed in itertools.product(cfg.runs, cfg.seeds):
            run_cfg = cfg.run_config(mode, seed)
            train_frame, _ = assemble(real["train"], synthetic.get(cfg.synthetic_set(mode)), run_cfg, mode, seed)
            check_classes(train_frame, real["validation"], cfg.allow_missing_classes)


def matched_epochs(mixed: dict, batch_size: int) -> int:
    """Real only's epochs under --real_schedule steps: enough for at least the optimiser steps of ``mixed`` (its
    table row) over the same real training images."""
    if mixed["steps"] is None:  # only the steps yardstick needs the count, so only it refuses an older run
        raise InputError(
            "--output_dir",
            f"{Path(mixed['checkpoint']).parent} was trained by an earlier version that did not count its steps",
            "pass a new --output_dir",
        )
    return math.ceil(mixed["steps"] / steps_per_epoch(mixed["n_real"], batch_size))


def run_row(cfg: CompareConfig, mode: str, seed: int, split: str, real_epochs: int | None = None) -> dict:
    """Train one run (or resume it), score its chosen checkpoint on ``split``, return its table row."""
    run_cfg = cfg.run_config(mode, seed, real_epochs)
    report = train(run_cfg)
    history = report["runs"][0]["history"]
    checkpoint = Path(run_cfg.output_dir) / CHECKPOINTS[cfg.checkpoint]
    result = evaluate(
        EvalConfig(
            checkpoint=str(checkpoint),
            data_dir=cfg.data_dir,
            split=split,
            output_dir=str(Path(run_cfg.output_dir) / f"eval-{split}"),
            min_group_size=cfg.min_group_size,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            skip_missing=cfg.skip_missing,
            device=cfg.device,
        )
    )
    n = report["runs"][0]["n_train"]
    o = result["overall"]
    return {
        "train": mode,
        "name": RUN_NAMES[mode],
        "seed": seed,
        "n_real": n.get("real", 0),
        "n_synthetic": n.get("synthetic", 0),
        **{key: o.get(key) for key, _ in METRICS[:4]},
        "worst_group_accuracy": result["worst_group_accuracy"],
        "worst_group": result["worst_group"],
        "max_gap": result["max_gap"],
        "max_gap_field": result["max_gap_field"],
        **{f"worst_{f}": result["subgroups"][f]["worst_accuracy"] for f in labels.SUBGROUP_FIELDS},
        **{f"worst_{f}_group": result["subgroups"][f]["worst_group"] for f in labels.SUBGROUP_FIELDS},
        "epochs": len(history),
        "steps": sum(h["steps"] for h in history) if all("steps" in h for h in history) else None,
        "checkpoint": str(checkpoint),
        "epoch": result["epoch"],
        "eval_dir": str(Path(run_cfg.output_dir) / f"eval-{split}"),
    }


def summarise(rows: Sequence[dict], by: Sequence[str] = ("train",), metrics: Sequence[str] = ()) -> list[dict]:
    """Mean and standard deviation over seeds of each metric, per group of ``by`` values, in first-seen order.

    ``n_real`` and ``n_synthetic`` are carried from a group's first row; missing values are skipped.
    """
    metrics = list(metrics) or [key for key, _ in METRICS]
    frame = pd.DataFrame(list(rows))
    out = []
    for keys, group in frame.groupby(list(by), sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip(by, keys, strict=True))
        row.update({k: group[k].iloc[0] for k in ("n_real", "n_synthetic") if k in group})
        row["seeds"] = int(group["seed"].nunique()) if "seed" in group else len(group)
        for m in metrics:
            values = pd.to_numeric(group[m], errors="coerce").dropna() if m in group else pd.Series(dtype=float)
            row[m] = float(values.mean()) if len(values) else None
            row[f"{m}_std"] = float(values.std(ddof=0)) if len(values) else None
        out.append(row)
    return out


def cell(row: dict, metric: str) -> str:
    """``mean ± std`` over seeds, or the single value; ``n/a`` when missing."""
    value, std = row.get(metric), row.get(f"{metric}_std")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.3f}" + (f" ± {std:.3f}" if row.get("seeds", 1) > 1 and std is not None else "")


def markdown(
    table: Sequence[dict],
    by: Sequence[tuple[str, str]] = (("train", "train"),),
    metrics: Sequence[tuple[str, str]] = METRICS,
    counts: bool = True,
) -> str:
    """The summary as a Markdown table: the ``by`` columns, image counts, then each metric as mean ± std."""
    heads = [title for _, title in by] + (["real imgs", "synthetic imgs"] if counts else []) + [t for _, t in metrics]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in table:
        cells = [str(r[k]) for k, _ in by] + (
            [str(r.get("n_real", "")), str(r.get("n_synthetic", ""))] if counts else []
        )
        lines.append("| " + " | ".join(cells + [cell(r, m) for m, _ in metrics]) + " |")
    return "\n".join(lines) + "\n"


def read_predictions(run: dict) -> pd.DataFrame:
    """A run's predictions.csv indexed by image: its ``image_id`` where each row has its own (two caption styles'
    folders hold the same real image at two paths), else its resolved path."""
    frame = pd.read_csv(Path(run["eval_dir"]) / "predictions.csv", dtype=str, keep_default_na=False)
    ids = frame["image_id"] if "image_id" in frame else pd.Series(dtype=str)
    if len(ids) and ids.ne("").all() and ids.is_unique:
        return frame.set_index(ids)
    return frame.set_index(frame["path"].map(os.path.realpath))


def differences(
    runs: Sequence[dict], reference: Sequence[dict], min_group_size: int, seed: int = 0, **keys
) -> list[dict]:
    """``runs`` minus ``reference`` (one run each per seed, paired by seed, scored on the same images): one row
    per metric with its 95% interval and verdict (``metrics.paired_differences``), plus ``keys`` in each row."""
    by_seed = {r["seed"]: r for r in reference}
    missing = [r["seed"] for r in runs if r["seed"] not in by_seed]
    if missing:
        raise ValueError(f"no reference run for seed(s) {missing}")
    pairs = [(read_predictions(r), read_predictions(by_seed[r["seed"]])) for r in runs]
    first = pairs[0][1]
    if any(set(f.index) != set(first.index) for pair in pairs for f in pair):
        raise ValueError("the runs were scored on different images; a paired comparison needs the same ones")
    pairs = [(a.loc[first.index], b.loc[first.index]) for a, b in pairs]
    groups = {f: first[f].tolist() for f in labels.SUBGROUP_FIELDS if f in first}
    result = paired_differences(
        first["label"].tolist(),
        [a["pred"].tolist() for a, _ in pairs],
        [b["pred"].tolist() for _, b in pairs],
        groups,
        min_group_size,
        seed=seed,
    )
    return [
        {**keys, "metric": metric, "n_images": len(first), "seeds": len(pairs), **r} for metric, r in result.items()
    ]


def difference_title(metric: str) -> str:
    return DIFFERENCE_TITLES.get(metric) or metric.replace("worst_", "worst ").replace("_", " ") + " acc."


def interval_text(low: float | None, high: float | None) -> str:
    return "n/a" if low is None else f"[{low:+.3f}, {high:+.3f}]"


def difference_table(
    rows: Sequence[dict], by: Sequence[tuple[str, str]] = (("name", "train"),)
) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the differences: the ``by`` columns, the reference, the metric, the difference, its
    interval(s) and the verdict, which comes from the intervals, never from the sign."""
    seeds = any(r["seeds"] > 1 for r in rows)
    heads = [t for _, t in by] + ["against", "metric", "difference", "95% interval (images)"]
    heads += ["95% interval (seeds)"] * seeds + ["verdict"]
    cells = [
        [str(r[k]) for k, _ in by]
        + [r["against"], difference_title(r["metric"]), f"{r['difference']:+.3f}", interval_text(r["low"], r["high"])]
        + [interval_text(r["seeds_low"], r["seeds_high"])] * seeds
        + [verdict_text(r)]
        for r in rows
    ]
    return heads, cells


def differences_markdown(rows: Sequence[dict], by: Sequence[tuple[str, str]] = (("name", "train"),)) -> str:
    heads, cells = difference_table(rows, by)
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"


def verdict_text(row: dict) -> str:
    """The verdict, saying so where the reference got every scored image right: there "no difference shown" is
    the split's ceiling, not a finding about the training set (nothing can score above 1.000)."""
    if row["verdict"] == NO_DIFFERENCE and row["b"] >= 1.0:
        return f"{NO_DIFFERENCE} ({row['against']} is at 1.000, the ceiling: nothing can be shown better here)"
    return row["verdict"]


def difference_text(row: dict) -> str:
    """One difference in a sentence: '<name> vs <against>: balanced acc. +0.017 [+0.000, +0.042], no difference shown'."""
    return (
        f"{row['name']} vs {row['against']}: {difference_title(row['metric'])} {row['difference']:+.3f} "
        f"{interval_text(row['low'], row['high'])}, {verdict_text(row)}"
    )


def interval_note(n_images: int, seeds: int) -> str:
    note = (
        f"Each difference is A minus B on the same {n_images} images, with a paired bootstrap {LEVEL:.0%} interval "
        f"({RESAMPLES} resamples of the images; balanced and worst-group accuracy recomputed on each)"
    )
    if seeds > 1:
        note += f", its mean over {seeds} seeds, and a t-interval over the seeds' differences"
    return (
        note + '. "better" or "worse" only where the interval excludes 0 (with several seeds, both intervals on '
        'the same side of 0); otherwise "no difference shown".'
    )


def schedule_note(rows: Sequence[dict]) -> str:
    """What --real_schedule steps gave real only, per seed: its epochs and steps beside the mixed run's."""
    by = {(r["train"], r["seed"]): r for r in rows}
    parts = [
        f"seed {seed}: {real['epochs']} epochs, {real['steps']} steps against {mixed['steps']}"
        for (mode, seed), real in by.items()
        if mode == "real" and (mixed := by.get(("mixed", seed)))
    ]
    return (
        "Real only trained as many optimiser steps as real + synthetic (--real_schedule steps): "
        + "; ".join(parts)
        + "."
    )


def compare(cfg: CompareConfig) -> dict:
    """Every (training set, seed) run, scored on one split; writes and returns the comparison result."""
    out = Path(cfg.output_dir)
    split = eval_split(cfg)
    check_inputs(cfg, split)
    done: dict[tuple[str, int], dict] = {}
    steps = cfg.real_schedule == "steps"
    # Under steps the mixed runs count first; one that starts from the synthetic-only run trains after it.
    for mode in sorted(
        cfg.runs, key=lambda m: (steps and m == "real", cfg.init_from == OWN_SYNTHETIC and m == "mixed")
    ):
        for seed in cfg.seeds:
            epochs = matched_epochs(done["mixed", seed], cfg.batch_size) if steps and mode == "real" else None
            done[mode, seed] = run_row(cfg, mode, seed, split, epochs)
    rows = [done[mode, seed] for mode in cfg.runs for seed in cfg.seeds]
    table = summarise(rows)
    reference = [r for r in rows if r["train"] == cfg.runs[0]]
    diffs = [
        row
        for mode in cfg.runs[1:]
        for row in differences(
            [r for r in rows if r["train"] == mode],
            reference,
            cfg.min_group_size,
            name=RUN_NAMES[mode],
            against=RUN_NAMES[cfg.runs[0]],
        )
    ]
    scored = read_table(cfg.data_dir, split, cfg.skip_missing)["label"]
    baseline = majority_baseline(read_table(cfg.data_dir, "train", cfg.skip_missing)["label"], scored)
    result = {
        "split": split,
        "n_eval": len(scored),
        "checkpoint": cfg.checkpoint,
        "baseline": baseline,
        "runs": rows,
        "table": table,
        "differences": diffs,
        "recipe": recipe(cfg),
        "mixed_dir": cfg.mixed_dir,
        "real_schedule": cfg.real_schedule,
    }
    write_json(out / RESULT_FILE, result)
    frames = {"compare_runs.csv": rows, "compare.csv": table, DIFFERENCE_FILE: diffs}
    for name, frame in ((name, pd.DataFrame(list(f))) for name, f in frames.items()):
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    text = (
        f"Scored on the real `{split}` split ({cfg.checkpoint} checkpoint of each run); mean ± std over seeds.\n\n"
        + markdown(table)
        + f"| majority class ({baseline['class']}) | | | {baseline['accuracy']:.3f} | "
        f"{baseline['balanced_accuracy']:.3f} | | | | |\n"
    )
    if "mixed" in cfg.runs:
        said = (
            ", ".join(f"{k}={v}" for k, v in result["recipe"].items()) or "the synthetic images added to the real ones"
        )
        text += f"\nReal + synthetic recipe: {said}" + (f", from {cfg.mixed_dir}" if cfg.mixed_dir else "") + ".\n"
    if steps:
        text += "\n" + schedule_note(rows) + "\n"
    if diffs:
        text += "\n" + interval_note(len(scored), len(cfg.seeds)) + "\n\n" + differences_markdown(diffs)
    write_text(out / "compare.md", text)
    print(text)
    print(f"wrote {out / RESULT_FILE}, {out / 'compare.csv'} and {out / 'compare.md'}")
    return result


def main(argv: list[str] | None = None) -> int:
    reads = ("data_dir", "synthetic_dir", "mixed_dir")
    return run_stage(compare, CompareConfig, argv, "compare.py", "the classifier comparison", reads, tables=reads)


if __name__ == "__main__":
    sys.exit(main())
