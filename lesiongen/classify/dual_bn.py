"""Separate BatchNorm statistics for synthetic images (``--synthetic_bn``), as AdvProp (Xie et al., CVPR 2020)
keeps an auxiliary BatchNorm for its adversarial images.

Generated images differ from real ones in their low-level statistics; sharing BatchNorm makes the running
means and variances used at evaluation a blend of both. Each BatchNorm layer gets an auxiliary twin that
normalises synthetic images and keeps their statistics; the real layer sees real images only and is the one
used at evaluation. The real layer keeps its parameter names, so the twin only adds ``<layer>.aux.*`` entries.
ViT has no such layer: LayerNorm normalises each image by its own statistics and keeps none, so there is
nothing to separate (the config refuses the flag there).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn


class DualBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d for real images plus ``aux``, its twin for synthetic ones, chosen by ``use_aux``."""

    def __init__(self, source: nn.BatchNorm2d) -> None:
        super().__init__(source.num_features, source.eps, source.momentum, source.affine, source.track_running_stats)
        self.load_state_dict(source.state_dict())
        self.aux = copy.deepcopy(source)  # starts where the real one starts (ImageNet statistics when pretrained)
        self.use_aux = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(x) if self.use_aux else super().forward(x)


def split_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by a ``DualBatchNorm2d`` holding the same weights."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, DualBatchNorm2d):
            setattr(model, name, DualBatchNorm2d(child))
        else:
            split_batchnorm(child)
    return model


def real_state_dict(model: nn.Module) -> dict:
    """The weights without the synthetic twins: the plain architecture's state dict, as timm loads it."""
    twins = tuple(f"{name}.aux." for name, m in model.named_modules() if isinstance(m, DualBatchNorm2d))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(twins)}


@contextmanager
def synthetic_statistics(model: nn.Module):
    """Inside, every dual BatchNorm of ``model`` normalises with (and updates) its synthetic twin."""
    layers = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    for m in layers:
        m.use_aux = True
    try:
        yield
    finally:
        for m in layers:
            m.use_aux = False


def forward_by_origin(model: nn.Module, x: torch.Tensor, synthetic: torch.Tensor) -> torch.Tensor:
    """Logits for a batch mixing real and synthetic images: each part goes through its own BatchNorm statistics
    (two forward passes, as AdvProp does), and the logits come back in the batch's order."""
    real_rows, synthetic_rows = torch.nonzero(~synthetic).squeeze(1), torch.nonzero(synthetic).squeeze(1)
    parts = []
    if len(real_rows):
        parts.append(model(x[real_rows]))
    if len(synthetic_rows):
        with synthetic_statistics(model):
            parts.append(model(x[synthetic_rows]))
    order = torch.cat([real_rows, synthetic_rows])
    return torch.cat(parts)[torch.argsort(order)]
