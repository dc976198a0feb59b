"""The classifier stage: one training loop over real, synthetic or mixed images (``classifier.py``).

Selects the epoch with the best validation balanced accuracy (``best.safetensors``), keeps ``last.safetensors``
every epoch and resumes from it, so a killed run repeats nothing and ends with the uninterrupted weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from .. import labels
from ..cli import run_stage
from ..devices import adamw, resolve_device
from ..errors import InputError
from ..files import write_json, write_jsonl
from .config import MIXING_OPTIONS, ClassifyConfig
from .data import (
    TrainingImages,
    check_classes,
    class_weights,
    drop_corrupt,
    lesion_folds,
    lesion_masks,
    load_tables,
    make_transform,
    targets,
)
from .dual_bn import forward_by_origin
from .metrics import classification_metrics, majority_baseline
from .mixing import assemble, epoch_frame, share_batches
from .models import (
    BEST,
    LAST,
    autocast,
    build_model,
    export_for_timm,
    pickled_checkpoint,
    predict_proba,
    read_checkpoint,
    save_checkpoint,
)

RUN_FIELDS = (
    *("model", "vit_name", "image_size", "train", "synthetic_dir", "synthetic_ratio", "balance", "folds"),
    "tone_augment",
    *MIXING_OPTIONS,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def evaluate_frame(
    model: nn.Module, frame: pd.DataFrame, cfg: ClassifyConfig, device: torch.device
) -> tuple[dict, np.ndarray]:
    proba = predict_proba(model, frame, cfg, device)
    pred = [labels.CODES[i] for i in proba.argmax(1)]
    return classification_metrics(frame["label"].tolist(), pred, proba), proba


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of ``make_train_loader`` over ``n_images`` without --synthetic_share: complete
    batches only, or one batch when they all fit in it. compare.py's --real_schedule steps counts with it."""
    return n_images // batch_size if n_images > batch_size else 1


def make_train_loader(
    cfg: ClassifyConfig, frame: pd.DataFrame, epoch: int, masks: dict[str, np.ndarray] | None = None
) -> DataLoader:
    """Order and augmentation are seeded per epoch, so a resumed run repeats the uninterrupted one."""
    y = targets(frame)
    transform = make_transform(cfg.image_size, cfg.augment)
    dataset = TrainingImages(frame, cfg.image_size, transform, cfg.tone_augment, masks)
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    if cfg.synthetic_share is not None and epoch < cfg.epochs:
        batches = share_batches(frame, cfg, generator)
        return DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, persistent_workers=False)
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


def classification_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    synthetic: torch.Tensor,
    class_weight: torch.Tensor | None,
    synthetic_weight: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy (class-weighted under --balance loss) in which each synthetic image's term is multiplied by
    ``synthetic_weight``; the normaliser stays that of the plain loss, so weight 1 is that loss exactly and
    weight 0 leaves only the real images' terms."""
    if synthetic_weight == 1.0:
        return F.cross_entropy(logits, y, weight=class_weight)
    terms = F.cross_entropy(logits, y, weight=class_weight, reduction="none")
    total = class_weight[y].sum() if class_weight is not None else torch.tensor(float(len(y)), device=y.device)
    scale = torch.where(synthetic, torch.tensor(synthetic_weight, device=y.device), torch.tensor(1.0, device=y.device))
    return (terms * scale).sum() / total


def train_epoch(
    model, loader, optimizer, class_weight, scaler, device, cfg: ClassifyConfig, desc: str
) -> tuple[float, int]:
    """One pass of ``loader``: the mean loss, and how many synthetic images it trained on."""
    model.train()
    total, n, n_synthetic = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)
    for x, y, synthetic in bar:
        x, y, synthetic = x.to(device), y.to(device), synthetic.to(device)
        with autocast(device, cfg.amp):
            logits = forward_by_origin(model, x, synthetic) if cfg.synthetic_bn else model(x)
            loss = classification_loss(logits.float(), y, synthetic, class_weight, cfg.synthetic_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(y)
        n += len(y)
        n_synthetic += int(synthetic.sum())
        bar.set_postfix(loss=f"{total / n:.3f}")
    return total / max(n, 1), n_synthetic


def same_setting(name: str, saved, given) -> bool:
    """A saved run setting against the one given; a folder is the same however it is spelled or linked."""
    if name in ("synthetic_dir", "init_from") and saved and given:
        return os.path.realpath(saved) == os.path.realpath(given)
    return saved == given


def resume_state(cfg: ClassifyConfig, out: Path) -> dict | None:
    """The saved state of this run, after checking it is the same kind of run."""
    if cfg.resume_from_checkpoint is None or cfg.resume_from_checkpoint.lower() == "none":
        return None
    path = out / LAST if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
    if not path.is_file():
        if cfg.resume_from_checkpoint != "latest":
            problem = f"{path} is a folder, not a checkpoint file" if path.is_dir() else f"{path} not found"
            raise InputError("--resume_from_checkpoint", problem, f"pass 'latest', 'none' or a {LAST} path")
        if (out / "last.pt").is_file():  # an earlier version's run: say so rather than silently start over
            raise pickled_checkpoint(out / "last.pt", "or pass --resume_from_checkpoint none to start over")
        return None
    state = read_checkpoint(path)
    defaults = {f.name: f.default for f in dataclasses.fields(ClassifyConfig)}
    for name in RUN_FIELDS:  # a setting newer than the checkpoint was its default then
        if not same_setting(name, state["config"].get(name, defaults[name]), getattr(cfg, name)):
            raise InputError(
                f"--{name}",
                f"{getattr(cfg, name)!r} differs from {state['config'].get(name)!r} in {path}",
                "use a new --output_dir, pass the original value, or --resume_from_checkpoint none",
            )
    return state


def start_from(model: nn.Module, path: Path) -> None:
    """--init_from: the model starts from another classifier's weights, e.g. one trained on synthetic images only,
    so that the real images train from what the synthetic ones taught rather than from random weights. BatchNorm
    twins for synthetic images (--synthetic_bn) that the other classifier lacks start fresh."""
    if not path.is_file():
        problem = f"{path} is a folder" if path.is_dir() else f"{path} not found"
        raise InputError("--init_from", problem, f"pass a classifier's {LAST} (or {BEST}) file")
    ckpt = read_checkpoint(path)
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        problems = [k for k in missing if ".aux." not in k] + list(unexpected)
    except RuntimeError as e:  # a weight of another shape
        problems = [str(e).splitlines()[-1].strip()[:160]]
    if problems:
        saved = ckpt["config"]
        raise InputError(
            "--init_from",
            f"{path} holds a {saved.get('model')} at {saved.get('image_size')} px whose weights do not fit this "
            f"model ({', '.join(problems[:3])})",
            "start from a classifier of the same --model (and --vit_name and --image_size for a ViT)",
        )
    print(f"starting from the weights of {path}")


def loss_weights(cfg: ClassifyConfig, frame: pd.DataFrame, device: torch.device) -> torch.Tensor | None:
    """Inverse class frequencies of the epoch's rows under --balance loss (a fine-tuning stage has its own)."""
    if cfg.balance != "loss":
        return None
    return torch.as_tensor(class_weights(targets(frame), len(labels.CODES)), dtype=torch.float32).to(device)


def fit(cfg: ClassifyConfig, train_frame: pd.DataFrame, val_frame: pd.DataFrame, out: Path) -> dict:
    """One training run: the best checkpoint by validation balanced accuracy, the last every epoch, summary.json."""
    from torch.utils.tensorboard import SummaryWriter

    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = torch.device(resolve_device(cfg.device))
    model = build_model(cfg, pretrained=cfg.pretrained and not cfg.init_from).to(device)  # --init_from's instead
    optimizer = adamw(model.parameters(), device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # One cosine decay over both stages (the fine-tuning epochs are its tail), as a function of the epochs asked
    # for, so resuming with more --epochs stretches the schedule.
    epochs = cfg.total_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")

    start, best, history = 0, {"score": -1.0, "epoch": None, "metrics": None}, []
    state = resume_state(cfg, out)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best, history = state["epoch"], state["best"], state["history"]
        print(f"resuming {out} after epoch {start}")
    elif cfg.init_from:
        start_from(model, Path(cfg.init_from))
    masks = lesion_masks(train_frame["path"].tolist(), cfg.image_size) if cfg.tone_augment else None
    writer = SummaryWriter(str(out / "logs"))
    for epoch in range(start, epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        frame = epoch_frame(train_frame, cfg, epoch)
        loader = make_train_loader(cfg, frame, epoch, masks)
        loss, n_synthetic = train_epoch(
            model,
            loader,
            optimizer,
            loss_weights(cfg, frame, device),
            scaler,
            device,
            cfg,
            f"epoch {epoch + 1}/{epochs}",
        )
        scheduler.step()
        metrics, _ = evaluate_frame(model, val_frame, cfg, device)
        row = {"epoch": epoch + 1, "train_loss": round(loss, 5), "lr": optimizer.param_groups[0]["lr"]}
        row["synthetic_images"] = n_synthetic
        row["steps"] = len(loader)
        if cfg.finetune_epochs:
            row["stage"] = "finetune" if epoch >= cfg.epochs else "pretrain"
        row.update({k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")})
        history.append(row)
        write_jsonl(out / "history.jsonl", history)  # rewritten whole, so a resumed run never repeats an epoch
        for k, v in row.items():
            if k not in ("epoch", "stage") and v is not None:
                writer.add_scalar(k if k in ("train_loss", "lr") else f"val/{k}", v, epoch + 1)
        if metrics["balanced_accuracy"] > best["score"]:
            best = {"score": metrics["balanced_accuracy"], "epoch": epoch + 1, "metrics": metrics}
            save_checkpoint(out / BEST, model, cfg, epoch + 1, extra={"metrics": metrics})
            export_for_timm(out, model, cfg, epoch + 1)
        save_checkpoint(
            out / LAST,
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
            f"epoch {epoch + 1}/{epochs}: loss {loss:.3f}, val balanced accuracy {metrics['balanced_accuracy']:.3f} "
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


def train(cfg: ClassifyConfig) -> dict:
    """Read the data once, then one run on the validation split or one run per lesion-grouped fold."""
    frames, skipped = load_tables(cfg.data_dir, cfg.train, cfg.synthetic_dir, cfg.skip_missing)
    frames = drop_corrupt(frames, skipped)
    out = Path(cfg.output_dir)
    if cfg.folds == 1:
        runs = [(frames["train"], frames["validation"], out)]
    else:
        pairs = lesion_folds(frames["train"], cfg.folds, cfg.seed)
        runs = [(tr, va, out / f"fold-{k}") for k, (tr, va) in enumerate(pairs)]
    results, notes = [], []
    for real_train, val, run_dir in runs:
        train_frame, note = assemble(real_train, frames.get("synthetic"), cfg, cfg.train, cfg.seed)
        absent = check_classes(train_frame, val, cfg.allow_missing_classes)
        notes += [note] if note else []
        notes += [f"{run_dir.name}: no training images of {', '.join(absent)}"] if absent else []
        counts = ", ".join(f"{v} {k}" for k, v in train_frame["origin"].value_counts().items())
        print(f"{run_dir}: training on {counts} images, validating on {len(val)} real images")
        if note:
            print(f"synthetic images: {note}")
        if cfg.finetune_epochs:
            print(f"{cfg.epochs} epochs on the {cfg.train} set, then {cfg.finetune_epochs} on the real images only")
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
    reads = ("data_dir", "synthetic_dir")
    return run_stage(train, ClassifyConfig, argv, "classifier.py", "classifier training", reads, tables=reads)


if __name__ == "__main__":
    sys.exit(main())
