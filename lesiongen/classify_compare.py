"""The ``classification/compare.py`` stage: real-only, synthetic-only and mixed runs in one table.

The paper's main result: the same classifier, settings and seeds, trained on each kind of data and
scored on the same real held-out split, overall and on its worst subgroup.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .classify import ClassifyConfig, train
from .classify_data import TRAIN_MODES
from .classify_eval import EvalConfig, evaluate
from .cli import option, parse_config, run
from .errors import InputError
from .files import atomic_path, write_text
from .metrics import majority_baseline
from .tables import METADATA, read_image_table

COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "worst_group_accuracy", "max_gap")


@dataclass
class CompareConfig(ClassifyConfig):
    """Train real-only, synthetic-only and mixed classifiers with the same settings and compare them."""

    train: str = option("real", help="not used: --runs names the training sets", choices=TRAIN_MODES)
    output_dir: str = option("comparison", help="one sub-folder per run, plus compare.csv and compare.md")
    runs: list[str] = option(list(TRAIN_MODES), help="which training sets to compare", choices=TRAIN_MODES)
    seeds: list[int] = option([0], help="one run per seed and training set; the table shows mean and spread")
    eval_split: str | None = option(
        None, help="real split scored in the table (default: test if it has images, else validation)"
    )
    min_group_size: int = option(5, help="smaller subgroups cannot be the worst group")

    def check(self) -> None:
        if self.train != "real":
            raise InputError("--train", "compare.py trains every set named by --runs", "use --runs instead of --train")
        super().check()
        if any(r != "real" for r in self.runs) and not self.synthetic_dir:
            raise InputError(
                "--synthetic_dir",
                "synthetic and mixed runs need synthetic images",
                "pass generate.py's output folder, or --runs real",
            )

    def run_config(self, mode: str, seed: int) -> ClassifyConfig:
        """The classifier config of one run: this config's settings with its own data, seed and folder."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(ClassifyConfig)}
        out = Path(self.output_dir) / f"{mode}-seed{seed}"
        return ClassifyConfig(**{**base, "train": mode, "seed": seed, "output_dir": str(out)})


def eval_split(cfg: CompareConfig) -> str:
    if cfg.eval_split:
        return cfg.eval_split
    return "test" if (Path(cfg.data_dir) / "test" / METADATA).is_file() else "validation"


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds for each training set, in the order the runs were given."""
    grouped = rows.groupby("train", sort=False)
    table = grouped[["n_real", "n_synthetic"]].first()
    for col in COLUMNS:
        table[col] = grouped[col].mean().round(4)
        table[f"{col}_std"] = grouped[col].std(ddof=0).round(4)
    table["seeds"] = grouped["seed"].count()
    return table.reset_index()


def markdown(table: pd.DataFrame, baseline: dict, split: str) -> str:
    head = "| train | real imgs | synthetic imgs | accuracy | balanced acc. | macro-F1 | macro AUC | worst-group acc. | best-worst gap |"
    lines = [f"Scored on the real `{split}` split; mean ± std over seeds.", "", head, "|" + "---|" * 9]
    for _, r in table.iterrows():
        cells = [f"{r[c]:.3f} ± {r[c + '_std']:.3f}" if pd.notna(r[c]) else "n/a" for c in COLUMNS]
        lines.append(f"| {r['train']} | {r['n_real']} | {r['n_synthetic']} | " + " | ".join(cells) + " |")
    lines.append(
        f"| majority class ({baseline['class']}) | | | {baseline['accuracy']:.3f} | {baseline['balanced_accuracy']:.3f} | | | | |"
    )
    return "\n".join(lines) + "\n"


def compare(cfg: CompareConfig) -> pd.DataFrame:
    out = Path(cfg.output_dir)
    split = eval_split(cfg)
    rows = []
    for mode in cfg.runs:
        for seed in cfg.seeds:
            run_cfg = cfg.run_config(mode, seed)
            report = train(run_cfg)
            n = report["runs"][0]["n_train"]
            result = evaluate(
                EvalConfig(
                    checkpoint=str(Path(run_cfg.output_dir) / "best.pt"),
                    data_dir=cfg.data_dir,
                    split=split,
                    min_group_size=cfg.min_group_size,
                    batch_size=cfg.batch_size,
                    num_workers=cfg.num_workers,
                    skip_missing=cfg.skip_missing,
                    device=cfg.device,
                )
            )
            o = result["overall"]
            rows.append(
                {
                    "train": mode,
                    "seed": seed,
                    "n_real": n.get("real", 0),
                    "n_synthetic": n.get("synthetic", 0),
                    **{c: o.get(c) for c in COLUMNS[:4]},
                    "worst_group_accuracy": result["worst_group_accuracy"],
                    "worst_group": result["worst_group"],
                    "max_gap": result["max_gap"],
                    "max_gap_field": result["max_gap_field"],
                    "best_epoch": report["runs"][0]["best_epoch"],
                }
            )
    per_run = pd.DataFrame(rows)
    table = summarise(per_run)
    train_labels = read_image_table(cfg.data_dir, "train")["label"]
    baseline = majority_baseline(train_labels, read_image_table(cfg.data_dir, split)["label"])
    with atomic_path(out / "compare_runs.csv") as tmp:
        per_run.to_csv(tmp, index=False)
    with atomic_path(out / "compare.csv") as tmp:
        table.to_csv(tmp, index=False)
    text = markdown(table, baseline, split)
    write_text(out / "compare.md", text)
    print(text)
    print(f"wrote {out / 'compare.csv'} and {out / 'compare.md'}")
    return table


def main(argv: list[str] | None = None) -> int:
    return run(lambda: compare(parse_config(CompareConfig, argv, prog="compare.py")))


if __name__ == "__main__":
    sys.exit(main())
