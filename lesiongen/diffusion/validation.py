"""Validation during training: one image per prompt from the current (or EMA) weights, as a grid PNG and in the
trackers (TensorBoard, W&B)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..files import atomic_path
from ..images import image_grid
from .config import TrainConfig
from .pipeline import assemble_pipeline


def default_prompts(examples) -> list[str]:
    """One real training caption per condition label (the first seen), so validation covers every class."""
    firsts: dict[str | None, str] = {}
    for ex in examples:
        firsts.setdefault(ex.label, ex.text)
    return list(firsts.values())[:8]


def ema_parameters(unet) -> list:
    """What the EMA copy follows: the parameters that train (the whole UNet in full mode, the LoRA adapters)."""
    return [p for p in unet.parameters() if p.requires_grad]


@contextlib.contextmanager
def swapped_in(ema, unet) -> Iterator[None]:
    """Use the EMA weights inside the block (validation), then put the training weights back."""
    if ema is None:
        yield
        return
    ema.store(ema_parameters(unet))
    ema.copy_to(ema_parameters(unet))
    try:
        yield
    finally:
        ema.restore(ema_parameters(unet))


@contextlib.contextmanager
def on_device(modules: list, device) -> Iterator[None]:
    """Borrow modules released from the accelerator (frozen encoders after caching) for the block, then release them."""
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


def validate(
    accelerator, cfg: TrainConfig, parts: dict, unet, text_encoders: dict, ema, prompts: list[str], step: int
) -> list:
    """One image per prompt, same seed every time: saved as a grid PNG, logged to the trackers (TensorBoard,
    W&B) and returned (the final ones become the model card's samples)."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler

    unet = accelerator.unwrap_model(unet)
    pipe = assemble_pipeline(parts, unet, {n: accelerator.unwrap_model(m) for n, m in text_encoders.items()})
    if parts["family"].objective == "ddpm":  # few-step DPM-Solver++; flow models keep their flow-matching Euler
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(parts["scheduler"].config)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    with swapped_in(ema, unet), accelerator.autocast(), torch.no_grad():
        images = [
            pipe(
                p,
                num_inference_steps=cfg.validation_inference_steps,
                height=cfg.resolution,
                width=cfg.resolution,
                generator=torch.Generator(accelerator.device).manual_seed(cfg.seed + i),
            ).images[0]
            for i, p in enumerate(prompts)
        ]
    unet.train(was_training)
    grid = image_grid(images, cols=min(len(images), 4))
    path = Path(cfg.output_dir) / "validation" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )
        if tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Image(im, caption=p) for im, p in zip(images, prompts, strict=True)]}, step=step
            )
    return images
