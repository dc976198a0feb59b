"""Classifier data: real/synthetic/mixed training tables, lesion-grouped folds, image checks, transforms.

Images are checked once in the main process before training, so a corrupt file is a counted,
reported skip and never an exception inside a DataLoader worker or a ``None`` sample.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from .. import labels
from ..captions.analyze import analyze_image
from ..captions.splits import grouped_kfold
from ..diffusion.edit import recolour_skin
from ..errors import InputError
from ..images import decode_problem, open_rgb
from ..tables import METADATA, read_image_table

# ImageNet statistics (timm's constants): the pretrained weights expect them, and from scratch they are harmless.
MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
TRAIN_MODES = ("real", "synthetic", "mixed")
SHARE_PER = ("epoch", "batch")


def _flip(size: int) -> list:
    return [v2.Resize(size), v2.CenterCrop(size), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]


def _standard(size: int) -> list:
    # Dermoscopy has no canonical orientation, so both flips and any rotation keep the label.
    return [
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25)),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(180),
        v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.1, hue=0.02),
    ]


AUGMENTATIONS: dict[str, Callable[[int], list]] = {
    "none": lambda size: [v2.Resize(size), v2.CenterCrop(size)],
    "flip": _flip,
    "standard": _standard,
}


def make_transform(size: int, augment: str = "none") -> v2.Compose:
    return v2.Compose(
        [v2.ToImage(), *AUGMENTATIONS[augment](size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    )


def find_corrupt(paths: list[str]) -> dict[str, str]:
    """Path -> reason for every image that does not decode completely."""
    bad = {}
    for p in tqdm(paths, desc="checking images", unit="img", disable=None, leave=False):
        problem = decode_problem(p)
        if problem:
            bad[p] = problem
    return bad


class ImageDataset(Dataset):
    """(image tensor, class index) for rows that already passed ``find_corrupt``."""

    def __init__(self, paths: list[str], targets: np.ndarray, size: int, transform: v2.Compose) -> None:
        self.paths, self.targets, self.size, self.transform = list(paths), np.asarray(targets), size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_rgb(self.paths[i], draft=self.size)), int(self.targets[i])


class TrainingImages(ImageDataset):
    """(image, class index, whether it is synthetic): the loss weight and the BatchNorm set follow the origin.

    With ``masks`` (``lesion_masks``), an image that has one gets its skin recoloured with probability
    ``tone_augment`` to a tone drawn uniformly from the ITA bands; the draws use torch's generator, which the
    loader seeds per epoch, so a resumed run recolours as the uninterrupted one did.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        size: int,
        transform: v2.Compose,
        tone_augment: float = 0.0,
        masks: dict[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(frame["path"].tolist(), targets(frame), size, transform)
        self.synthetic = (frame["origin"] != "real").to_numpy()
        self.tone_augment, self.masks = tone_augment, masks or {}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        image = open_rgb(self.paths[i], draft=self.size)
        mask = self.masks.get(self.paths[i])
        if self.tone_augment and mask is not None and float(torch.rand(())) < self.tone_augment:
            tone = labels.SKIN_TONE_NAMES[int(torch.randint(len(labels.SKIN_TONE_NAMES), ()))]
            image = Image.fromarray(recolour_skin(np.asarray(image), mask, labels.skin_tone_ita(tone)))
        return self.transform(image), int(self.targets[i]), bool(self.synthetic[i])


def lesion_masks(paths: list[str], size: int) -> dict[str, np.ndarray]:
    """Path -> the analyzer's lesion mask of the image as training loads it (``draft=size``), measured once per run
    for --tone_augment; an image whose lesion cannot be measured is left out, and so never recoloured."""
    masks = {}
    for p in tqdm(sorted(set(paths)), desc="measuring lesions", unit="img", disable=None, leave=False):
        found = analyze_image(np.asarray(open_rgb(p, draft=size)))
        if not found["problem"]:
            masks[p] = found["mask"]
    return masks


def targets(frame: pd.DataFrame) -> np.ndarray:
    index = {c: i for i, c in enumerate(labels.CODES)}
    return frame["label"].map(index).to_numpy(dtype=np.int64)


def read_table(path: str, split: str | None, skip_missing: bool) -> pd.DataFrame:
    """An image table under the classifier commands' ``--skip_missing`` policy, which its errors name."""
    return read_image_table(path, split, on_missing="skip" if skip_missing else "error", skip_flag="--skip_missing")


def read_real(data_dir: str, split: str, skip_missing: bool) -> pd.DataFrame:
    """A split of a build_captions folder; a manifest has no splits, so it cannot be --data_dir."""
    if not (Path(data_dir) / split / METADATA).is_file():
        raise InputError(
            data_dir,
            f"no {split}/{METADATA}",
            "pass the --output_dir folder of build_captions.py as --data_dir (synthetic manifests go to --synthetic_dir)",
        )
    return read_table(data_dir, split, skip_missing).assign(origin="real")


def load_tables(
    data_dir: str, mode: str, synthetic_dir: str | None, skip_missing: bool = False
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Real train and validation (train also sizes --synthetic_ratio) and, when used, the synthetic table."""
    frames = {
        "train": read_real(data_dir, "train", skip_missing),
        "validation": read_real(data_dir, "validation", skip_missing),
    }
    if mode != "real":
        frames["synthetic"] = read_table(synthetic_dir, None, skip_missing)
    skipped = {
        f"{name}_{reason}": len(rows) for name, f in frames.items() for reason, rows in f.attrs["skipped"].items()
    }
    return frames, skipped


def drop_corrupt(frames: dict[str, pd.DataFrame], skipped: dict[str, int]) -> dict[str, pd.DataFrame]:
    """Decode every image once; corrupt ones are removed, counted and named on stderr."""
    out = {}
    for name, frame in frames.items():
        bad = find_corrupt(frame["path"].tolist())
        if bad:
            skipped[f"{name}_corrupt_image"] = len(bad)
            first = next(iter(bad.items()))
            print(f"{name}: skipped {len(bad)} corrupt image(s), e.g. {first[0]} ({first[1]})", file=sys.stderr)
            frame = frame[~frame["path"].isin(bad)].reset_index(drop=True)
        if frame.empty:
            raise InputError(name, "no readable images left after removing corrupt ones", "check the image files")
        out[name] = frame
    return out


def check_classes(train: pd.DataFrame, val: pd.DataFrame, allow_missing: bool) -> list[str]:
    """Classes in validation but absent from training cannot be learnt: an error unless allowed."""
    absent = sorted(set(val["label"]) - set(train["label"]))
    if absent and not allow_missing:
        counts = ", ".join(f"{c} ({int((val['label'] == c).sum())} validation images)" for c in absent)
        raise InputError(
            "training data",
            f"no training images of class(es) {counts}",
            "add training images of those classes, or pass --allow_missing_classes to score them as misses",
        )
    return absent


def lesion_folds(frame: pd.DataFrame, k: int, seed: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """(train, held-out) pairs for k-fold cross-validation, grouped by lesion_id so no lesion is in two folds."""
    if "lesion_id" not in frame.columns:
        raise InputError("--folds", "the training table has no lesion_id column", "rebuild it with build_captions.py")
    groups = frame["lesion_id"].astype(str).tolist()
    folds = grouped_kfold(frame["label"].tolist(), groups, k, seed)
    pairs = []
    for held in folds:
        mask = np.zeros(len(frame), dtype=bool)
        mask[held] = True
        pairs.append((frame[~mask].reset_index(drop=True), frame[mask].reset_index(drop=True)))
    return pairs


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights with mean 1 over present classes; absent classes weigh 0."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = len(y) / (present.sum() * counts[present])
    return w
