"""Validation during training: one image per prompt from the current (or EMA) weights, as a grid PNG and in TensorBoard."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_path
from .pipeline import assemble_pipeline

if TYPE_CHECKING:
    from .train import TrainConfig


def default_prompts(examples) -> list[str]:
    """One real training caption per condition label (the first seen), so validation covers every class."""
    firsts: dict[str | None, str] = {}
    for ex in examples:
        firsts.setdefault(ex.label, ex.text)
    return list(firsts.values())[:8]


@contextlib.contextmanager
def swapped_in(ema, unet) -> Iterator[None]:
    """Use the EMA weights inside the block (validation), then put the training weights back."""
    if ema is None:
        yield
        return
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield
    finally:
        ema.restore(unet.parameters())


def validate(
    accelerator, cfg: TrainConfig, parts: dict, unet, text_encoder, ema, prompts: list[str], step: int
) -> Path:
    """A grid of one image per prompt, saved as PNG and logged to TensorBoard; same seed every time."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.utils import make_image_grid

    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    pipe = assemble_pipeline(parts, unet, text_encoder)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(parts["scheduler"].config)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    with swapped_in(ema, unet), accelerator.autocast(), torch.no_grad():
        images = [
            pipe(
                p,
                num_inference_steps=cfg.validation_inference_steps,
                generator=torch.Generator(accelerator.device).manual_seed(cfg.seed + i),
            ).images[0]
            for i, p in enumerate(prompts)
        ]
    unet.train(was_training)
    cols = min(len(images), 4)
    grid = (
        make_image_grid(images, rows=math.ceil(len(images) / cols), cols=cols)
        if len(images) % cols == 0
        else _pad_grid(images, cols)
    )
    path = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )
    return path


def _pad_grid(images, cols):
    from diffusers.utils import make_image_grid
    from PIL import Image

    blank = Image.new("RGB", images[0].size)
    padded = images + [blank] * (-len(images) % cols)
    return make_image_grid(padded, rows=len(padded) // cols, cols=cols)
