"""Classifier settings, checked when built: what ``classifier.py`` trains and ``compare.py`` shares across its runs.

``ClassifierSettings`` holds everything a run and a comparison have in common; ``ClassifyConfig`` adds the
one run's training set and folder, so ``compare.py`` has no ``--train`` flag that it would have to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cli import option
from ..devices import AUTO
from ..errors import InputError
from .data import AUGMENTATIONS, TRAIN_MODES

MODEL_NAMES = ("resnet18", "vit")  # the keys of models.MODELS (the registry imports torch; configs do not)
BALANCING = ("none", "sampler", "loss")


@dataclass
class ClassifierSettings:
    """Data, model and optimisation settings shared by every classifier run."""

    # data
    data_dir: str = option(help="build_captions.py output folder (train split trains, validation selects)")
    synthetic_dir: str | None = option(None, help="generate.py output folder or its manifest.csv")
    synthetic_ratio: float | None = option(None, help="synthetic images per real training image (default: all)")
    skip_missing: bool = option(False, help="skip (and count) images listed but not on disk instead of stopping")
    allow_missing_classes: bool = option(False, help="train even if a validation class has no training images")
    # model
    model: str = option("resnet18", help="classifier architecture", choices=MODEL_NAMES)
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
    # runs
    folds: int = option(1, help="K >= 2: K-fold cross-validation on the train split, grouped by lesion")
    seed: int = option(0, help="seed for weights, sampling, augmentation and folds")
    resume_from_checkpoint: str | None = option(
        "latest", help="'latest' resumes output_dir/last.safetensors; none starts fresh"
    )
    num_workers: int = option(2, help="DataLoader worker processes")
    device: str = option(AUTO, help="auto (cuda when available), cpu, cuda, cuda:1 ...")

    def __post_init__(self) -> None:
        if self.synthetic_ratio is not None and not 0 < self.synthetic_ratio < float("inf"):  # nan too
            raise InputError(
                "--synthetic_ratio", f"must be a positive number, got {self.synthetic_ratio}", "e.g. 1.0, or omit it"
            )
        for name in ("epochs", "batch_size", "folds"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name}", f"must be at least 1, got {getattr(self, name)}", "pass a positive number"
                )
        if self.num_workers < 0:
            raise InputError(
                "--num_workers", f"must be 0 or more, got {self.num_workers}", "0 loads images in this process"
            )
        if self.image_size < 16:
            raise InputError("--image_size", f"{self.image_size} px is too small", "use 16 or more")
        if not 0 < self.lr < float("inf"):  # false for nan too
            raise InputError("--lr", f"must be a positive number, got {self.lr}", "e.g. 1e-3")


@dataclass
class ClassifyConfig(ClassifierSettings):
    """Train a skin-lesion classifier on real, synthetic or mixed images."""

    train: str = option("real", help="which images train the model", choices=TRAIN_MODES)
    output_dir: str = option("weights", help="where checkpoints, logs and metrics go")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train != "real" and not self.synthetic_dir:
            raise InputError(
                "--synthetic_dir", f"--train {self.train} needs synthetic images", "pass generate.py's output folder"
            )


def config_from_dict(values: dict) -> ClassifyConfig:
    """Rebuild a stored config, ignoring fields this version no longer has."""
    known = ClassifyConfig.__dataclass_fields__
    return ClassifyConfig(**{k: v for k, v in values.items() if k in known})
