"""The classifier registry (a name -> constructor, as timm does), checkpoints, and running a model on images.

The head always has one output per ``labels.CODES`` entry, so every checkpoint scores the same classes
whatever data trained it. Checkpoints are safetensors with their config in the header (``states.py``):
loading one never unpickles, so a checkpoint from anywhere cannot run code. Pickled ``.pt`` files from
earlier versions are refused with the command that converts a trusted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import labels
from ..errors import InputError
from ..states import read_state, write_state
from .config import ClassifyConfig, config_from_dict
from .data import ImageDataset, make_transform
from .dual_bn import split_batchnorm


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


def build_model(cfg: ClassifyConfig) -> nn.Module:
    """The registry's model for ``cfg``, with separate synthetic BatchNorm statistics under --synthetic_bn."""
    model = MODELS[cfg.model](len(labels.CODES), cfg)
    return split_batchnorm(model) if cfg.synthetic_bn else model


BEST, LAST = "best.safetensors", "last.safetensors"
FORMAT = "lesiongen-classifier"  # the checkpoint's "format" entry, so another state file is told apart
PICKLED_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")
PICKLED_MAGIC = (b"PK\x03\x04", b"\x80\x02\x8a\x0a")  # torch.save's zip and legacy formats
CHECKPOINT_FIX = f"pass {BEST} or {LAST} written by classifier.py, or its output folder"


def is_pickled(path: Path) -> bool:
    with open(path, "rb") as f:
        return path.suffix in PICKLED_SUFFIXES or f.read(4) in PICKLED_MAGIC


def pickled_checkpoint(path: Path, fix: str = "") -> InputError:
    """The refusal of a ``torch.save`` checkpoint, naming the command that converts one the user trusts."""
    convert = (
        f"if you trust its source, convert it: python -m lesiongen.classify.convert_checkpoint --checkpoint {path}"
    )
    return InputError(
        path,
        "is a pickled checkpoint (earlier versions wrote .pt files); it is not loaded, because unpickling runs "
        "any code the file contains",
        convert + (f"; {fix}" if fix else ""),
    )


def checkpoint_file(path: Path) -> Path:
    """The checkpoint a path means: the file itself, or an output folder's best one."""
    if not path.is_dir():
        return path
    return next((path / n for n in (BEST, "best.pt") if (path / n).is_file()), path / BEST)


def check_checkpoint(path: Path, ckpt: dict) -> dict:
    """``ckpt`` if it is a classifier checkpoint for this version's classes, else an InputError saying why not."""
    if ckpt.get("format") != FORMAT or "model" not in ckpt or "config" not in ckpt:
        raise InputError(path, "is not a LesionGen classifier checkpoint", CHECKPOINT_FIX)
    classes = list(ckpt.get("classes", []))
    if classes != list(labels.CODES):
        raise InputError(
            path,
            f"was trained for {len(classes)} classes ({', '.join(classes)}), "
            f"this version scores {len(labels.CODES)} ({', '.join(labels.CODES)})",
            "retrain the classifier with this version, in a new --output_dir",
        )
    return ckpt


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by this stage for this version's classes, read without unpickling anything."""
    if not path.is_file():
        raise InputError(path, "checkpoint not found", CHECKPOINT_FIX)
    if is_pickled(path):
        raise pickled_checkpoint(path)
    return check_checkpoint(path, read_state(path, CHECKPOINT_FIX))


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ClassifyConfig, dict]:
    """A trained model from best/last.safetensors, or from an output folder's best one."""
    path = Path(path)
    ckpt = read_checkpoint(checkpoint_file(path))
    cfg = config_from_dict(ckpt["config"])
    model = build_model(replace(cfg, pretrained=False))  # weights come from the checkpoint
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise InputError(
            path, f"weights do not fit a {cfg.model} with {len(labels.CODES)} classes ({str(e)[:200]})", "retrain"
        ) from None
    return model.to(device).eval(), cfg, ckpt


def autocast(device: str | torch.device, enabled: bool):
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=torch.float16 if kind == "cuda" else torch.bfloat16, enabled=enabled)


@torch.no_grad()
def predict_proba(
    model: nn.Module, frame: pd.DataFrame, cfg: ClassifyConfig, device: str | torch.device, desc: str = "predict"
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


def save_checkpoint(path: Path, model: nn.Module, cfg: ClassifyConfig, epoch: int, extra: dict) -> None:
    """Weights, classes, config, epoch and ``extra`` (metrics; optimiser, scheduler and scaler state) in one file."""
    state = {"format": FORMAT, "classes": list(labels.CODES), "config": asdict(cfg), "epoch": epoch, **extra}
    write_state(path, {**state, "model": model.state_dict()})
