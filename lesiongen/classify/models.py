"""The classifier: any timm architecture by name, its checkpoints, its export for timm, and running it on images.

The head always has one output per ``labels.CODES`` entry, so every checkpoint scores the same classes
whatever data trained it. Beside its checkpoints a run leaves ``model.safetensors`` and ``config.json`` in
timm's Hub layout, so the classifier loads with ``timm.create_model`` where LesionGen is not installed. Checkpoints are safetensors with their config in the header (``states.py``):
loading one never unpickles, so a checkpoint from anywhere cannot run code. Pickled ``.pt`` files from
earlier versions are refused with the command that converts a trusted one.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import labels
from ..errors import InputError
from ..files import atomic_path
from ..states import read_state, write_state
from .config import ClassifyConfig, config_from_dict
from .data import MEAN, STD, ImageDataset, make_transform
from .dual_bn import real_state_dict, split_batchnorm

# The names the original's commands used keep working. Its ResNet18 is torchvision's, which timm holds as
# resnet18.tv_in1k: the same parameter names and outputs, and with zero_init_last off the same initial weights
# from the same seed, so earlier checkpoints load and earlier runs' figures reproduce. "vit" is --vit_name's variant.
ALIASES: dict[str, tuple[str, dict]] = {"resnet18": ("resnet18.tv_in1k", {"zero_init_last": False})}
MODEL_FIX = "pass a name from timm.list_models(), e.g. resnet50, convnext_tiny, efficientnet_b0, vit_small_patch16_224"


def architecture(cfg: ClassifyConfig) -> tuple[str, dict]:
    """The timm model name ``--model`` means, and the arguments that make an alias the original's network."""
    return (cfg.vit_name, {}) if cfg.model == "vit" else ALIASES.get(cfg.model, (cfg.model, {}))


def build_model(cfg: ClassifyConfig, pretrained: bool | None = None) -> nn.Module:
    """Any timm architecture with one output per ``labels.CODES`` entry, from ImageNet weights if ``--pretrained``,
    with separate BatchNorm statistics for synthetic images under ``--synthetic_bn``."""
    import timm

    name, kwargs = architecture(cfg)
    if not timm.is_model(name):
        raise InputError("--vit_name" if cfg.model == "vit" else "--model", f"timm has no model '{name}'", MODEL_FIX)
    default = timm.get_pretrained_cfg(name)
    # Models with a fixed input size (ViTs) are built for --image_size; convolutional ones take any size as they are.
    if default is not None and default.fixed_input_size:
        kwargs = {**kwargs, "img_size": cfg.image_size}
    pretrained = cfg.pretrained if pretrained is None else pretrained
    if pretrained and not (default and (default.hf_hub_id or default.url or default.file)):
        raise InputError("--pretrained", f"timm publishes no pretrained weights for {name}", "pass --pretrained false")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=len(labels.CODES), **kwargs)
    except OSError as e:
        raise InputError(
            "--pretrained",
            f"ImageNet weights for {name} could not be had ({type(e).__name__}: {str(e)[:160]})",
            "pass --pretrained false to start from random weights, or run once online to fill the Hugging Face cache",
        ) from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch and cfg.image_size % patch[0]:
        raise InputError(
            "--image_size",
            f"{cfg.image_size} is not a multiple of {name}'s patch size {patch[0]}",
            f"use a multiple of {patch[0]}",
        )
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
    model = build_model(cfg, pretrained=False)  # the weights come from the checkpoint
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


TIMM_WEIGHTS, TIMM_CONFIG = "model.safetensors", "config.json"


def export_for_timm(folder: Path, model: nn.Module, cfg: ClassifyConfig, epoch: int) -> None:
    """The model as timm publishes one (``model.safetensors``, ``config.json``), so it leaves LesionGen.

    ``timm.create_model("local-dir:FOLDER")`` loads it, and uploaded as a Hub repository it loads as
    ``hf-hub:USER/REPO``. The config is written by timm's own ``save_config_for_hf`` (what ``push_to_hf_hub``
    uploads) with the preprocessing ``make_transform`` applies; the run's settings ride along under ``lesiongen``.
    """
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    preprocessing = {
        "input_size": (3, cfg.image_size, cfg.image_size),
        "mean": MEAN,
        "std": STD,
        "interpolation": "bilinear",
        "crop_pct": 1.0,  # Resize then CenterCrop to the same size
        "crop_mode": "center",
    }
    described = {
        "label_names": list(labels.CODES),
        "label_descriptions": {code: labels.BY_CODE[code].name for code in labels.CODES},
        "lesiongen": {"config": asdict(cfg), "epoch": epoch},
    }
    weights = {k: v.detach().cpu().contiguous() for k, v in real_state_dict(model).items()}
    with atomic_path(folder / TIMM_WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / TIMM_CONFIG) as tmp:
        save_config_for_hf(model, str(tmp), model_config=described, data_config=preprocessing)
