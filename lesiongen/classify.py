"""The classifier stage: ``ClassifyConfig``, the model registry and one training loop.

Trains on real, synthetic or mixed images (the paper's comparison), selects the epoch with the best
validation balanced accuracy, and resumes from ``last.pt``. The head always has one output per
``labels.CODES`` entry, so every checkpoint scores the same classes whatever data trained it.
"""

from __future__ import annotations

import math
import pickle
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from . import labels
from .classify_data import (
    AUGMENTATIONS,
    TRAIN_MODES,
    ImageDataset,
    assemble,
    check_classes,
    class_weights,
    drop_corrupt,
    lesion_folds,
    load_tables,
    make_transform,
    targets,
)
from .cli import option, parse_config, run
from .errors import InputError
from .files import atomic_path, write_json, write_jsonl
from .metrics import classification_metrics, majority_baseline

BALANCING = ("none", "sampler", "loss")
# Fields that fix what a checkpoint is; resuming with a different value is an error, not an override.
RUN_FIELDS = ("model", "vit_name", "image_size", "train", "synthetic_dir", "synthetic_ratio", "balance", "folds")


def _pretrained_error(model: str, err: Exception, fix: str) -> InputError:
    return InputError(
        "--pretrained", f"ImageNet weights for {model} are not available offline ({type(err).__name__}: {err})", fix
    )


def build_resnet18(num_classes: int, cfg: ClassifyConfig) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    if cfg.pretrained:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False, check_hash=False)
        except OSError as e:
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise _pretrained_error(
                "resnet18", e, f"put {Path(weights.url).name} at {cache}, or drop --pretrained"
            ) from None
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.load_state_dict(state, strict=False)
    return model


def build_vit(num_classes: int, cfg: ClassifyConfig) -> nn.Module:
    import timm

    try:
        model = timm.create_model(
            cfg.vit_name, pretrained=cfg.pretrained, num_classes=num_classes, img_size=cfg.image_size
        )
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise InputError(
            "--vit_name", f"timm has no model '{cfg.vit_name}'", "e.g. vit_tiny_patch16_224, vit_small_patch16_224"
        ) from None
    except OSError as e:
        fix = "download it once online into the Hugging Face cache, set HF_HUB_OFFLINE=1 to skip retries, or drop --pretrained"
        raise _pretrained_error(cfg.vit_name, e, fix) from None
    patch = model.patch_embed.patch_size[0]
    if cfg.image_size % patch:
        raise InputError(
            "--image_size",
            f"{cfg.image_size} is not a multiple of {cfg.vit_name}'s patch size {patch}",
            f"use a multiple of {patch}",
        )
    return model


MODELS: dict[str, Callable[[int, ClassifyConfig], nn.Module]] = {"resnet18": build_resnet18, "vit": build_vit}


@dataclass
class ClassifyConfig:
    """Train a skin-lesion classifier on real, synthetic or mixed images."""

    # data
    data_dir: str = option(help="build_captions.py output folder (train split trains, validation selects)")
    train: str = option("real", help="which images train the model", choices=TRAIN_MODES)
    synthetic_dir: str | None = option(None, help="generate.py output folder or its manifest.csv")
    synthetic_ratio: float | None = option(None, help="synthetic images per real training image (default: all)")
    skip_missing: bool = option(False, help="skip (and count) images listed but not on disk instead of stopping")
    allow_missing_classes: bool = option(False, help="train even if a validation class has no training images")
    # model
    model: str = option("resnet18", help="classifier architecture", choices=tuple(MODELS))
    vit_name: str = option("vit_small_patch16_224", help="timm ViT variant for --model vit")
    pretrained: bool = option(False, help="start from ImageNet weights in the local torch/timm cache")
    image_size: int = option(224, help="square input size in pixels", aliases=("--resolution",))
    # optimisation
    epochs: int = option(20, help="training epochs")
    batch_size: int = option(64, help="images per step")
    lr: float = option(1e-3, help="AdamW learning rate (cosine decay)", aliases=("--learning_rate",))
    weight_decay: float = option(1e-4, help="AdamW weight decay")
    augment: str = option("standard", help="training augmentation", choices=tuple(AUGMENTATIONS))
    balance: str = option("sampler", help="class balancing: weighted sampling or loss weights", choices=BALANCING)
    amp: bool = option(False, help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    # runs and checkpoints
    folds: int = option(1, help="K >= 2: K-fold cross-validation on the train split, grouped by lesion")
    seed: int = option(0, help="seed for weights, sampling, augmentation and folds")
    output_dir: str = option("weights", help="where checkpoints, logs and metrics go")
    resume_from_checkpoint: str | None = option("latest", help="'latest' resumes output_dir/last.pt; none starts fresh")
    num_workers: int = option(2, help="DataLoader worker processes")
    device: str | None = option(None, help="cuda, cpu, ... (default: cuda when available)")

    def check(self) -> None:
        if self.train != "real" and not self.synthetic_dir:
            raise InputError(
                "--synthetic_dir", f"--train {self.train} needs synthetic images", "pass generate.py's output folder"
            )
        if self.synthetic_ratio is not None and self.synthetic_ratio <= 0:
            raise InputError(
                "--synthetic_ratio", f"must be positive, got {self.synthetic_ratio}", "e.g. 1.0, or omit it"
            )
        for name in ("epochs", "batch_size", "folds"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name}", f"must be at least 1, got {getattr(self, name)}", "pass a positive number"
                )
        if self.image_size < 16:
            raise InputError("--image_size", f"{self.image_size} px is too small", "use 16 or more")
        if self.lr <= 0:
            raise InputError("--lr", f"must be positive, got {self.lr}", "e.g. 1e-3")


def config_from_dict(values: dict) -> ClassifyConfig:
    """Rebuild a stored config, ignoring fields this version no longer has."""
    known = ClassifyConfig.__dataclass_fields__
    return ClassifyConfig(**{k: v for k, v in values.items() if k in known})


def read_checkpoint(path: Path) -> dict:
    """A checkpoint dict written by this stage for this version's classes, or an InputError saying why not."""
    fix = "pass best.pt or last.pt written by classifier.py"
    if not path.is_file():
        raise InputError(path, "checkpoint not found", fix)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise InputError(path, f"is not a readable checkpoint ({type(e).__name__})", fix) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise InputError(path, "is not a LesionGen classifier checkpoint", fix)
    classes = list(ckpt.get("classes", []))
    if classes != list(labels.CODES):
        raise InputError(
            path,
            f"was trained for {len(classes)} classes ({', '.join(classes)}), "
            f"this version scores {len(labels.CODES)} ({', '.join(labels.CODES)})",
            "retrain the classifier with this version, in a new --output_dir",
        )
    return ckpt


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ClassifyConfig, dict]:
    """A trained model from best.pt/last.pt (or a run folder's best.pt)."""
    path = Path(path)
    ckpt = read_checkpoint(path / "best.pt" if path.is_dir() else path)
    cfg = config_from_dict(ckpt["config"])
    model = MODELS[cfg.model](len(labels.CODES), replace(cfg, pretrained=False))  # weights come from the checkpoint
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise InputError(
            path, f"weights do not fit a {cfg.model} with {len(labels.CODES)} classes ({str(e)[:200]})", "retrain"
        ) from None
    return model.to(device).eval(), cfg, ckpt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def pick_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def predict_proba(
    model: nn.Module, frame: pd.DataFrame, cfg: ClassifyConfig, device: torch.device, desc: str = "predict"
) -> np.ndarray:
    """Softmax probabilities, one column per ``labels.CODES`` entry, in row order."""
    dataset = ImageDataset(frame["path"].tolist(), np.zeros(len(frame)), cfg.image_size, make_transform(cfg.image_size))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    model.eval()
    out = []
    for x, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        with autocast(device, cfg.amp):
            out.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
    return torch.cat(out).numpy()


def evaluate_frame(
    model: nn.Module, frame: pd.DataFrame, cfg: ClassifyConfig, device: torch.device
) -> tuple[dict, np.ndarray]:
    proba = predict_proba(model, frame, cfg, device)
    pred = [labels.CODES[i] for i in proba.argmax(1)]
    return classification_metrics(frame["label"].tolist(), pred, proba), proba


def make_train_loader(cfg: ClassifyConfig, frame: pd.DataFrame, epoch: int) -> DataLoader:
    """Order and augmentation are seeded per epoch, so a resumed run repeats the uninterrupted one."""
    y = targets(frame)
    dataset = ImageDataset(frame["path"].tolist(), y, cfg.image_size, make_transform(cfg.image_size, cfg.augment))
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    sampler = None
    if cfg.balance == "sampler":
        weights = class_weights(y, len(labels.CODES))[y]
        sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(y), generator=generator)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=cfg.num_workers,
        drop_last=len(y) > cfg.batch_size,
        persistent_workers=False,
    )


def train_epoch(model, loader, optimizer, loss_fn, scaler, device, cfg: ClassifyConfig, desc: str) -> float:
    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        with autocast(device, cfg.amp):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.3f}")
    return total / max(n, 1)


def resume_state(cfg: ClassifyConfig, out: Path) -> dict | None:
    """The saved state of this run, after checking it is the same kind of run."""
    if cfg.resume_from_checkpoint is None or cfg.resume_from_checkpoint.lower() == "none":
        return None
    path = out / "last.pt" if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
    if not path.is_file():
        if cfg.resume_from_checkpoint == "latest":
            return None
        raise InputError("--resume_from_checkpoint", f"{path} not found", "pass 'latest', 'none' or a last.pt path")
    state = read_checkpoint(path)
    for name in RUN_FIELDS:
        if state["config"].get(name) != getattr(cfg, name):
            raise InputError(
                f"--{name}",
                f"{getattr(cfg, name)!r} differs from {state['config'].get(name)!r} in {path}",
                "use a new --output_dir, pass the original value, or --resume_from_checkpoint none",
            )
    return state


def fit(cfg: ClassifyConfig, train_frame: pd.DataFrame, val_frame: pd.DataFrame, out: Path) -> dict:
    """One training run: best.pt by validation balanced accuracy, last.pt every epoch, summary.json."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model = MODELS[cfg.model](len(labels.CODES), cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Cosine decay as a function of cfg.epochs, so resuming with more --epochs stretches the schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / cfg.epochs)))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    y_train = targets(train_frame)
    weight = (
        torch.as_tensor(class_weights(y_train, len(labels.CODES)), dtype=torch.float32)
        if cfg.balance == "loss"
        else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)

    start, best, history = 0, {"score": -1.0, "epoch": None, "metrics": None}, []
    state = resume_state(cfg, out)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best, history = state["epoch"], state["best"], state["history"]
        print(f"resuming {out} after epoch {start}")
    write_json(out / "config.json", asdict(cfg))
    writer = SummaryWriter(str(out / "logs"))
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        loader = make_train_loader(cfg, train_frame, epoch)
        loss = train_epoch(model, loader, optimizer, loss_fn, scaler, device, cfg, f"epoch {epoch + 1}/{cfg.epochs}")
        scheduler.step()
        metrics, _ = evaluate_frame(model, val_frame, cfg, device)
        row = {"epoch": epoch + 1, "train_loss": round(loss, 5), "lr": optimizer.param_groups[0]["lr"]}
        row.update({k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")})
        history.append(row)
        write_jsonl(out / "history.jsonl", history)  # rewritten whole, so a resumed run never repeats an epoch
        for k, v in row.items():
            if k != "epoch" and v is not None:
                writer.add_scalar(k if k in ("train_loss", "lr") else f"val/{k}", v, epoch + 1)
        if metrics["balanced_accuracy"] > best["score"]:
            best = {"score": metrics["balanced_accuracy"], "epoch": epoch + 1, "metrics": metrics}
            save_checkpoint(out / "best.pt", model, cfg, epoch + 1, extra={"metrics": metrics})
        save_checkpoint(
            out / "last.pt",
            model,
            cfg,
            epoch + 1,
            extra={
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "best": best,
                "history": history,
            },
        )
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.3f}, val balanced accuracy {metrics['balanced_accuracy']:.3f} "
            f"(best {best['score']:.3f} at epoch {best['epoch']})"
        )
    writer.close()
    summary = {
        "output_dir": str(out),
        "best_epoch": best["epoch"],
        "best_balanced_accuracy": best["score"],
        "best_metrics": best["metrics"],
        "majority_baseline": majority_baseline(train_frame["label"], val_frame["label"]),
        "n_train": {k: int(v) for k, v in train_frame["origin"].value_counts().items()},
        "n_validation": len(val_frame),
        "train_classes": {k: int(v) for k, v in train_frame["label"].value_counts().items()},
        "history": history,
    }
    write_json(out / "summary.json", summary)
    return summary


def save_checkpoint(path: Path, model: nn.Module, cfg: ClassifyConfig, epoch: int, extra: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "classes": list(labels.CODES),
                "config": asdict(cfg),
                "epoch": epoch,
                **extra,
            },
            tmp,
        )


def train(cfg: ClassifyConfig) -> dict:
    """Read the data once, then one run on the validation split or one run per lesion-grouped fold."""
    frames, skipped = load_tables(cfg.data_dir, cfg.train, cfg.synthetic_dir, cfg.skip_missing)
    frames = drop_corrupt(frames, cfg.image_size, skipped)
    out = Path(cfg.output_dir)
    if cfg.folds == 1:
        runs = [(frames["train"], frames["validation"], out)]
    else:
        pairs = lesion_folds(frames["train"], cfg.folds, cfg.seed)
        runs = [(tr, va, out / f"fold-{k}") for k, (tr, va) in enumerate(pairs)]
    results, notes = [], []
    for real_train, val, run_dir in runs:
        train_frame, note = assemble(real_train, frames.get("synthetic"), cfg.train, cfg.synthetic_ratio, cfg.seed)
        absent = check_classes(train_frame, val, cfg.allow_missing_classes)
        notes += [note] if note else []
        notes += [f"{run_dir.name}: no training images of {', '.join(absent)}"] if absent else []
        counts = ", ".join(f"{v} {k}" for k, v in train_frame["origin"].value_counts().items())
        print(f"{run_dir}: training on {counts} images, validating on {len(val)} real images")
        results.append(fit(cfg, train_frame, val, run_dir))
    report = {"skipped": skipped, "notes": notes, "runs": results}
    write_json(out / "data_report.json", {"skipped": skipped, "notes": notes})
    if cfg.folds > 1:
        scores = np.array([r["best_balanced_accuracy"] for r in results])
        report["cv_balanced_accuracy"] = {"mean": round(float(scores.mean()), 4), "std": round(float(scores.std()), 4)}
        print(f"{cfg.folds}-fold balanced accuracy {scores.mean():.3f} +- {scores.std():.3f}")
        write_json(out / "cv_summary.json", report)
    if skipped:
        print(f"skipped: {', '.join(f'{v} {k}' for k, v in skipped.items())}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    return run(lambda: train(parse_config(ClassifyConfig, argv, prog="classifier.py")))


if __name__ == "__main__":
    sys.exit(main())
