"""The filter stage: mark generated images a filter model does not recognise, or that copy a real one, as invalid.

    python -m lesiongen.evaluate.filter --synthetic GEN_DIR --data_dir OUT_OF_BUILD_CAPTIONS --output_dir FILTER_DIR
        [--folds 3] [--min_probability 0.1] [--copy_ratio 0.5]

The filter model is trained on the real TRAIN split only, cross-fitted: the train split is cut into ``--folds``
lesion-grouped folds (``classify.data.lesion_folds``), and fold k's model trains on the other folds and selects its
epoch on fold k. No validation or test image is read, so the filter is never the classifier that scores
recognisability in the evaluate stage (that one is a real-only classifier trained with the validation split for
evaluation), and a classifier later trained on the filtered set is still scored on images nothing chose by.
Generated images belong to no fold: each is scored by the mean probability of the k fold models.

An image is dropped when the mean probability of its asked class (the manifest's ``label``) is below
``--min_probability``, or when the memorisation check of the evaluate stage (``fidelity.memorisation``, in the
first fold model's feature space) flags it as a near-copy of a real training image; a variant made from a real
image (``generate.py --mode augment``, the manifest's ``source``) is compared with the training images other than
its own source. Nothing is deleted or moved:
the manifest keeps every row, a dropped one with ``valid`` false and its reason (``filter: p(mel)=0.04 < 0.10``,
``near-copy of train/<real file>``), which every reader of image tables leaves out; ``metadata.jsonl`` is rewritten
from the valid rows. A rerun first restores the rows this stage dropped, so it is idempotent; images that
generation marked invalid stay so and are not scored. FILTER_DIR keeps the fold models (``models/fold-<k>``),
``scores.csv`` (every scored image's probability and nearest real image) and ``filter.json`` (kept and dropped
counts per class and per reason).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import labels
from ..classify import train as classify
from ..classify.config import ClassifyConfig
from ..classify.data import lesion_folds, read_real
from ..classify.mixing import without_leaks
from ..classify.models import load_classifier, predict_proba
from ..cli import option, run_stage
from ..devices import AUTO, resolve_device
from ..diffusion.manifest import Manifest
from ..errors import InputError
from ..files import atomic_path, output_lock, write_json
from ..tables import METADATA
from . import fidelity
from .features import domain_space, extract

FILTER_PREFIX = "filter: "
COPY_PREFIX = "near-copy of "


@dataclass
class FilterConfig:
    """Mark generated images that a train-split filter model does not recognise, or near-copies, as invalid."""

    synthetic: str = option(help="generate.py output folder (or its manifest.csv); its manifest is rewritten in place")
    data_dir: str = option(help="build_captions.py output folder: only its train split is read")
    output_dir: str = option(help="folder for the filter models, scores.csv and filter.json")
    folds: int = option(3, help="lesion-grouped folds of the train split, one filter model each (>= 2)")
    min_probability: float = option(
        0.1, help="drop an image whose asked class gets a mean filter probability below this"
    )
    copy_ratio: float = option(
        0.5,
        help="drop an image whose nearest-real distance is below this fraction of that real image's own "
        "nearest-real distance (the evaluate stage's memorisation check)",
    )
    model: str = option("resnet18", help="filter model: any timm architecture")
    pretrained: bool = option(True, help="start from ImageNet weights; false: random weights")
    image_size: int = option(224, help="square input size in pixels")
    epochs: int = option(10, help="training epochs of each fold model")
    batch_size: int = option(64, help="images per step")
    seed: int = option(0, help="seed for the folds and the models")
    num_workers: int = option(2, help="DataLoader worker processes")
    device: str = option(AUTO, help="auto (cuda when available), cpu, cuda ...")

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise InputError("--folds", f"must be >= 2 to cross-fit, got {self.folds}", "use e.g. --folds 3")
        if not 0 <= self.min_probability <= 1:
            raise InputError(
                "--min_probability", f"must be in [0, 1], got {self.min_probability}", "use e.g. --min_probability 0.1"
            )
        if not 0 < self.copy_ratio <= 1:
            raise InputError("--copy_ratio", f"must be in (0, 1], got {self.copy_ratio}", "use e.g. --copy_ratio 0.5")


def manifest_path(synthetic: str | Path) -> Path:
    path = Path(synthetic)
    path = path if path.suffix == ".csv" else path / "manifest.csv"
    if not path.is_file():
        raise InputError(f"--synthetic {synthetic}", "holds no manifest.csv", "pass a generate.py output folder")
    return path


def filter_train_split(data_dir: str) -> pd.DataFrame:
    """The real train split, the only real images the filter reads."""
    if not (Path(data_dir) / "train" / METADATA).is_file():
        raise InputError(f"--data_dir {data_dir}", f"has no train/{METADATA}", "pass a build_captions.py output folder")
    return read_real(data_dir, "train", skip_missing=False)


def train_filters(cfg: FilterConfig, train: pd.DataFrame) -> list[Path]:
    """One classifier per lesion-grouped fold of ``train``, each trained on the other folds (resumed when done)."""
    models = Path(cfg.output_dir) / "models"
    folds = {"folds": cfg.folds, "seed": cfg.seed}  # which train images each fold model saw
    saved = json.loads((models / "folds.json").read_text()) if (models / "folds.json").is_file() else folds
    if saved != folds:
        raise InputError(
            f"--output_dir {cfg.output_dir}",
            f"holds filter models of other folds ({saved}, not {folds})",
            "choose a new --output_dir, or pass the original --folds and --seed",
        )
    write_json(models / "folds.json", folds)
    settings = {k: v for k, v in asdict(cfg).items() if k in ClassifyConfig.__dataclass_fields__}
    runs = []
    for k, (fold_train, held) in enumerate(lesion_folds(train, cfg.folds, cfg.seed)):
        out = models / f"fold-{k}"
        ccfg = ClassifyConfig(
            **{**settings, "data_dir": cfg.data_dir, "output_dir": str(out), "folds": 1, "train": "real"}
        )
        print(f"filter model {k + 1}/{cfg.folds}: training on {len(fold_train)} train images, selecting on {len(held)}")
        classify.fit(ccfg, fold_train, held, out)
        runs.append(out)
    return runs


def mean_probabilities(runs: list[Path], frame: pd.DataFrame, device: str) -> np.ndarray:
    """The mean softmax of the fold models' best checkpoints, one column per ``labels.CODES`` entry."""
    total = np.zeros((len(frame), len(labels.CODES)))
    for run in runs:
        model, mcfg, _ = load_classifier(run, device)
        total += predict_proba(model, frame, mcfg, device, desc=f"filter {run.name}")
    return total / len(runs)


def near_copies(real: np.ndarray, fake: np.ndarray, sources: np.ndarray, copy_ratio: float) -> dict[str, np.ndarray]:
    """The evaluate stage's memorisation check, except that a variant (generate.py --mode augment) is measured
    against the real images other than its own source: it is made from that image on purpose.

    ``sources``: each fake's row in ``real`` it was made from, -1 for none."""
    copies = fidelity.memorisation(real, fake, copy_ratio)
    own = np.flatnonzero((sources >= 0) & (copies["nearest"] == sources))
    for source in np.unique(sources[own]):
        rows = own[sources[own] == source]
        again = fidelity.memorisation(np.delete(real, source, axis=0), fake[rows], copy_ratio)
        again["nearest"] += again["nearest"] >= source  # back to rows of ``real``
        for key, values in again.items():
            copies[key][rows] = values
    return copies


def is_filter_reason(reason: str) -> bool:
    return reason.startswith((FILTER_PREFIX, COPY_PREFIX))


def drop_reason(label: str, p: float, floor: float, copy_of: str | None) -> str:
    """Why a row is dropped ('' when it is kept): the filter probability first, then a near-copy."""
    if p < floor:
        return f"{FILTER_PREFIX}p({label})={p:.2f} < {floor:.2f}"
    return f"{COPY_PREFIX}{copy_of}" if copy_of else ""


def summarise(rows: list[dict], scored: set[str]) -> dict:
    """Kept and dropped counts per class and per reason kind, over the rows this stage scored."""
    out: dict = {"kept": 0, "dropped": 0, "per_class": {}, "per_reason": {"filter": 0, "near-copy": 0}}
    for row in rows:
        if row["file_name"] not in scored:
            continue
        kind = "kept" if row["valid"] != "false" else "dropped"
        out[kind] += 1
        counts = out["per_class"].setdefault(row["label"], {"kept": 0, "dropped": 0})
        counts[kind] += 1
        if kind == "dropped":
            out["per_reason"]["filter" if row["invalid_reason"].startswith(FILTER_PREFIX) else "near-copy"] += 1
    return out


def filter_set(cfg: FilterConfig) -> dict:
    """Train the cross-fitted filter, score the generated set, and rewrite its manifest with the drops marked."""
    path = manifest_path(cfg.synthetic)
    train = filter_train_split(cfg.data_dir)
    device = resolve_device(cfg.device)
    with output_lock(path.parent, "--synthetic"):
        manifest = Manifest(path)
        rows = manifest.read()
        for row in rows:  # a rerun starts from the manifest as generation left it
            if row["valid"] == "false" and is_filter_reason(row["invalid_reason"]):
                row["valid"], row["invalid_reason"] = "true", ""
        todo = [r for r in rows if r["valid"] != "false"]
        if not todo:
            raise InputError(path, "lists no valid generated image to filter", "generate images first")
        unknown = sorted({r["label"] for r in todo} - set(labels.CODES))
        if unknown:
            raise InputError(path, f"asks for unknown class(es) {', '.join(unknown)}", "regenerate with known classes")
        frame = pd.DataFrame({"path": [str(path.parent / r["file_name"]) for r in todo]})
        runs = train_filters(cfg, train)
        proba = mean_probabilities(runs, frame, device)
        space = domain_space(runs[0])
        real_x, fake_x = extract(space, train["path"].tolist()), extract(space, frame["path"].tolist())
        anchored, _ = without_leaks(train, frame.assign(source=[r["source"] for r in todo], table=str(path)))
        sources = anchored["source_row"].reindex(frame.index, fill_value=-1).to_numpy()
        copies = near_copies(real_x, fake_x, sources, cfg.copy_ratio)
        copies["nearest_real"] = ("train/" + train["file_name"]).to_numpy()[copies["nearest"]]
        columns = {c: i for i, c in enumerate(labels.CODES)}
        scores = []
        for i, row in enumerate(todo):
            p = float(proba[i, columns[row["label"]]])
            nearest = copies["nearest_real"][i]
            reason = drop_reason(row["label"], p, cfg.min_probability, nearest if copies["flagged"][i] else None)
            if reason:
                row["valid"], row["invalid_reason"] = "false", reason
            scores.append({"file_name": row["file_name"], "label": row["label"], "probability": round(p, 4)})
            scores[-1].update(nearest_real=nearest, copy_ratio=round(float(copies["ratio"][i]), 4), dropped=reason)
        manifest.rewrite(rows)
        manifest.write_metadata()
    with atomic_path(Path(cfg.output_dir) / "scores.csv") as tmp:
        pd.DataFrame(scores).to_csv(tmp, index=False)
    summary = {"config": asdict(cfg), "manifest": str(path), **summarise(rows, {r["file_name"] for r in todo})}
    write_json(Path(cfg.output_dir) / "filter.json", summary)
    print(f"kept {summary['kept']}, dropped {summary['dropped']} of {len(todo)} generated images")
    for label, counts in summary["per_class"].items():
        print(f"  {label}: kept {counts['kept']}, dropped {counts['dropped']}")
    print(
        f"  dropped by the filter {summary['per_reason']['filter']}, as near-copies {summary['per_reason']['near-copy']}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    reads = ("synthetic", "data_dir")
    return run_stage(filter_set, FilterConfig, argv, "lesiongen-filter", "the filter", reads, tables=("synthetic",))


if __name__ == "__main__":
    sys.exit(main())
