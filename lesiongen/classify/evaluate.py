"""The ``classification/eval.py`` stage: checkpoint + images -> predictions -> metrics JSON, CSV and PNG.

Reports overall, per-class and per-subgroup metrics (sex, age bin, body site, skin tone) with the
worst group and the best-worst gap, because the paper's claim is about the worst subgroup too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .. import labels
from ..cli import option, parse_config, run
from ..devices import AUTO, resolve_device
from ..files import atomic_path, write_json
from ..tables import METADATA, SPLITS
from .data import drop_corrupt, read_table
from .metrics import classification_metrics, subgroup_metrics, worst_group_summary
from .models import load_classifier, predict_proba


@dataclass
class EvalConfig:
    """Score a trained classifier per class and per subgroup."""

    checkpoint: str = option(help="best.safetensors / last.safetensors written by classifier.py, or its output folder")
    data_dir: str = option(help="build_captions.py folder, a metadata.jsonl, or a generate.py manifest")
    split: str | None = option(None, help="split of a build_captions folder (default: validation)", choices=SPLITS)
    output_dir: str | None = option(None, help="where results go (default: eval-<split> beside the checkpoint)")
    min_group_size: int = option(5, help="smaller subgroups are listed but cannot be the worst or best group")
    batch_size: int = option(64, help="images per forward pass")
    num_workers: int = option(2, help="DataLoader worker processes")
    skip_missing: bool = option(False, help="skip (and count) listed images missing on disk")
    device: str = option(AUTO, help="auto (cuda when available), cpu, cuda, cuda:1 ...")


def resolve_split(data_dir: str, split: str | None) -> str | None:
    """A build_captions folder defaults to its validation split; a single table is read whole."""
    if split is None and (Path(data_dir) / "validation" / METADATA).is_file():
        return "validation"
    return split


def score(frame: pd.DataFrame, proba: np.ndarray, min_group_size: int = 1) -> dict:
    """All metrics for predictions ``proba`` (columns follow ``labels.CODES``) on ``frame``'s rows."""
    pred = [labels.CODES[i] for i in np.asarray(proba).argmax(1)]
    y_true = frame["label"].tolist()
    overall = classification_metrics(y_true, pred, proba)
    groups = {f: frame[f].tolist() for f in labels.SUBGROUP_FIELDS}
    subgroups = subgroup_metrics(y_true, pred, groups, min_group_size)
    return {"overall": overall, "subgroups": subgroups, **worst_group_summary(subgroups)}


def metrics_table(result: dict) -> pd.DataFrame:
    """One row for all images, then one per subgroup: the CSV a spreadsheet user wants."""
    o = result["overall"]
    rows = [
        {
            "field": "all",
            "group": "all",
            "n": o["n"],
            "accuracy": o["accuracy"],
            "balanced_accuracy": o["balanced_accuracy"],
            "ranked": True,
        }
    ]
    for field, s in result["subgroups"].items():
        for group, g in s["groups"].items():
            rows.append({"field": field, "group": group, **g})
    return pd.DataFrame(rows)


def per_class_table(result: dict) -> pd.DataFrame:
    o = result["overall"]
    rows = [
        {"class": c, "condition": labels.BY_CODE[c].name, **v, "auc": o.get("auc_ovr", {}).get(c)}
        for c, v in o["per_class"].items()
    ]
    return pd.DataFrame(rows)


def plot_confusion(result: dict, path: Path) -> None:
    """Row-normalised confusion matrix over the classes that occur, with counts in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = result["overall"]
    cm = np.array(o["confusion_matrix"])
    keep = [i for i in range(len(o["classes"])) if cm[i].sum() or cm[:, i].sum()]
    cm = cm[np.ix_(keep, keep)]
    names = [o["classes"][i] for i in keep]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(names), 0.8 + 0.7 * len(names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_title(f"balanced accuracy {o['balanced_accuracy']:.3f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_results(result: dict, frame: pd.DataFrame, proba: np.ndarray, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    for name, table in (("metrics.csv", metrics_table(result)), ("per_class.csv", per_class_table(result))):
        with atomic_path(out / name) as tmp:
            table.to_csv(tmp, index=False)
    keep = [c for c in ("path", "label", "lesion_id", "image_id", *labels.SUBGROUP_FIELDS) if c in frame.columns]
    preds = frame[keep].copy()
    preds["pred"] = [labels.CODES[i] for i in proba.argmax(1)]
    for j, c in enumerate(labels.CODES):
        preds[f"p_{c}"] = proba[:, j].round(5)
    with atomic_path(out / "predictions.csv") as tmp:
        preds.to_csv(tmp, index=False)
    plot_confusion(result, out / "confusion_matrix.png")


def evaluate(cfg: EvalConfig) -> dict:
    device = resolve_device(cfg.device)
    model, model_cfg, ckpt = load_classifier(cfg.checkpoint, device)
    split = resolve_split(cfg.data_dir, cfg.split)
    frame = read_table(cfg.data_dir, split, cfg.skip_missing)
    skipped = {k: len(v) for k, v in frame.attrs["skipped"].items()}
    frame = drop_corrupt({"eval": frame}, skipped)["eval"]
    model_cfg = replace(model_cfg, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device)
    proba = predict_proba(model, frame, model_cfg, device)
    result = score(frame, proba, cfg.min_group_size)
    result.update(
        checkpoint=str(cfg.checkpoint), epoch=ckpt.get("epoch"), data=str(cfg.data_dir), split=split, skipped=skipped
    )
    ckpt_dir = Path(cfg.checkpoint) if Path(cfg.checkpoint).is_dir() else Path(cfg.checkpoint).parent
    out = Path(cfg.output_dir) if cfg.output_dir else ckpt_dir / f"eval-{split or 'all'}"
    write_results(result, frame, proba, out)
    o = result["overall"]
    print(
        f"{len(frame)} images: accuracy {o['accuracy']:.3f}, balanced accuracy {o['balanced_accuracy']:.3f}, "
        f"macro-F1 {o['macro_f1']:.3f}, macro AUC {o.get('macro_auc') or float('nan'):.3f}; "
        f"worst group {result['worst_group']} ({result['worst_group_accuracy']}), largest gap {result['max_gap']} ({result['max_gap_field']})"
    )
    print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    return run(lambda: evaluate(parse_config(EvalConfig, argv, prog="eval.py")))


if __name__ == "__main__":
    sys.exit(main())
