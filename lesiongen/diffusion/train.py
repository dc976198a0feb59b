"""Fine-tune Stable Diffusion on lesion captions: LoRA or full UNet (+EMA), one loop, driven by accelerate.

    accelerate launch -m lesiongen.diffusion.train --mode lora --pretrained_model_name_or_path MODEL \\
        --train_data_dir CAPTIONS/train --output_dir OUT

``train_lora.sh`` and ``train_SD.sh`` call this with the original LesionGen defaults. The two modes
differ only in the three helpers of ``MODES`` (what trains, whether an EMA copy steps, how the result
is saved); everything else is the same loop.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..cli import parse_config, run
from ..errors import InputError
from ..files import write_json, write_text
from .checkpoints import (
    find_resume_checkpoint,
    keep_trainable_weights,
    latest_checkpoint,
    load_checkpoint,
    model_card,
    publish,
    remove_stale_temporaries,
    run_record,
    save_checkpoint,
)
from .config import DEFAULT_LR, TrainConfig
from .validation import default_prompts, validate


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimiser step run by this call
    step_seconds: list[float] = field(default_factory=list)  # wall time of each of those steps (benchmarks)


# ---------------------------------------------------------------------------------------------------
# The loss, on tensors (tests call it directly)


def diffusion_loss(model_pred, target, timesteps, noise_scheduler, snr_gamma: float | None = None):
    """MSE, optionally min-SNR weighted (Hang et al. 2023): hard, noisy timesteps stop dominating the gradient."""
    import torch
    import torch.nn.functional as F
    from diffusers.training_utils import compute_snr

    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    per_item = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(
        dim=list(range(1, model_pred.ndim))
    )
    return (per_item * weights).mean()


def step_generator(seed: int, batch_number: int, device):
    """Noise, timesteps and VAE samples for a batch come from (seed, batch number): resume draws the same numbers."""
    import torch

    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_number * 7_919 + 1)


def batch_loss(batch: dict, unet, vae, text_encoder, noise_scheduler, generator, snr_gamma=None, noise_offset=0.0):
    """One denoising loss: latents (cached distribution or VAE), captions (cached or encoded), noise, UNet."""
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_params" in batch:
        dist = DiagonalGaussianDistribution(batch["latent_params"].to(vae.device, vae.dtype))
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
    latents = dist.sample(generator=generator) * vae.config.scaling_factor
    if "prompt_embeds" in batch:
        text = batch["prompt_embeds"].to(latents.device)
    else:
        text_trains = any(p.requires_grad for p in text_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and text_trains):
            text = text_encoder(batch["input_ids"].to(latents.device))[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # Offset noise (Lin et al. 2023): a per-channel constant lets the model shift overall brightness.
        noise = noise + noise_offset * torch.randn(
            (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(
        noisy, timesteps, encoder_hidden_states=text.to(noisy.dtype) if text.dtype != noisy.dtype else text
    ).sample
    return diffusion_loss(pred, target, timesteps, noise_scheduler, snr_gamma)


# ---------------------------------------------------------------------------------------------------
# The three helpers in which LoRA and full training differ


def lora_trainable(parts: dict, cfg: TrainConfig) -> list:
    """LoRA: only the adapters on the UNet attention projections train; everything else is frozen."""
    from .pipeline import add_lora

    for name in ("unet", "text_encoder", "vae"):
        parts[name].requires_grad_(False)
    add_lora(parts["unet"], cfg.rank, cfg.lora_alpha, seed=cfg.seed)
    return [parts["unet"]]


def full_trainable(parts: dict, cfg: TrainConfig) -> list:
    """Full: the whole UNet trains (and the text encoder with --train_text_encoder)."""
    parts["vae"].requires_grad_(False)
    parts["unet"].requires_grad_(True)
    parts["text_encoder"].requires_grad_(cfg.train_text_encoder)
    return [parts["unet"], parts["text_encoder"]] if cfg.train_text_encoder else [parts["unet"]]


def no_ema(unet, cfg: TrainConfig):
    return None


def unet_ema(unet, cfg: TrainConfig):
    """An EMA copy of the UNet weights (diffusers' EMAModel), only with --use_ema."""
    if not cfg.use_ema:
        return None
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)


def save_lora_result(out: Path, parts: dict, unet, text_encoder, ema) -> None:
    """LoRA weights in the diffusers format that ``pipe.load_lora_weights(dir)`` reads."""
    from .pipeline import save_lora

    save_lora(unet, unet.peft_config["default"], out)


def save_full_result(out: Path, parts: dict, unet, text_encoder, ema) -> None:
    """A complete pipeline folder with the EMA weights swapped in, for ``from_pretrained``."""
    import torch

    from .pipeline import assemble_pipeline

    if ema is not None:
        ema.copy_to(unet.parameters())
    assemble_pipeline(parts, unet.to(torch.float32), text_encoder.to(torch.float32)).save_pretrained(out)


@dataclass(frozen=True)
class Mode:
    trainable: Callable  # (parts, cfg) -> modules whose parameters train
    make_ema: Callable  # (unet, cfg) -> EMAModel | None
    save_result: Callable  # (folder, parts, unet, text_encoder, ema) -> None
    published_last: str  # the file whose presence marks the saved result complete


MODES = {
    "lora": Mode(lora_trainable, no_ema, save_lora_result, "pytorch_lora_weights.safetensors"),
    "full": Mode(full_trainable, unet_ema, save_full_result, "model_index.json"),
}


# ---------------------------------------------------------------------------------------------------
# Setup helpers


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def weight_dtype(accelerator):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def place_models(parts: dict, trained: list, accelerator, gradient_checkpointing: bool) -> None:
    """Frozen weights go to the device in the compute dtype; trainable ones (and LoRA adapters) stay float32."""
    import torch
    from diffusers.training_utils import cast_training_params

    dtype = weight_dtype(accelerator)
    for name in ("unet", "text_encoder", "vae"):
        module = parts[name]
        fully_trained = any(module is m for m in trained) and all(p.requires_grad for p in module.parameters())
        target = torch.float32 if fully_trained else dtype
        module.to(accelerator.device)
        if module.dtype != target:
            module.to(dtype=target)
    cast_training_params(parts["unet"], dtype=torch.float32)
    if gradient_checkpointing:
        parts["unet"].enable_gradient_checkpointing()
        if any(parts["text_encoder"] is m for m in trained):
            parts["text_encoder"].gradient_checkpointing_enable()


def make_dataset(cfg: TrainConfig, examples, parts: dict, accelerator, text_trains: bool):
    """Cached latents (and frozen text embeddings) when allowed, else images decoded every step."""
    from .dataset import ImageCaptionDataset
    from .latent_cache import CachedLatentDataset, cache_key, encode_dataset, load_or_build

    images = ImageCaptionDataset(examples, parts["tokenizer"], cfg.resolution, cfg.center_crop)
    if not cfg.cache_latents:
        return images
    text_encoder = None if text_trains else parts["text_encoder"]
    key = cache_key(
        examples,
        cfg.pretrained_model_name_or_path,
        cfg.resolution,
        cfg.center_crop,
        parts["vae"].dtype,
        text_encoder is not None,
    )
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "latent_cache"
    with accelerator.main_process_first():
        cache = load_or_build(
            cache_dir,
            key,
            lambda: encode_dataset(images, parts["vae"], text_encoder, show_progress=accelerator.is_main_process),
        )
    return CachedLatentDataset(cache, examples, parts["tokenizer"])


def tracker_config(cfg: TrainConfig) -> dict:
    """TensorBoard hparams accept only scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(cfg).items()}


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> TrainResult:
    """Set up, resume, run ``max_train_steps`` optimiser steps, checkpoint, validate, save the result."""
    import torch
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .dataset import PlannedBatches, make_loader, read_examples
    from .pipeline import base_identity, load_training_parts

    accelerator = make_accelerator(cfg)
    out = Path(cfg.output_dir)
    resume_from = find_resume_checkpoint(cfg)
    mode = MODES[cfg.mode]

    parts = load_training_parts(cfg.pretrained_model_name_or_path)
    base = base_identity(cfg.pretrained_model_name_or_path)  # after loading, so a hub model is in the cache
    examples = read_examples(cfg.train_data_dir, parts["tokenizer"])
    torch.manual_seed(cfg.seed)
    trained = mode.trainable(parts, cfg)
    place_models(parts, trained, accelerator, cfg.gradient_checkpointing)
    ema = mode.make_ema(parts["unet"], cfg)
    if ema is not None:
        ema.to(accelerator.device)
    text_trains = any(m is parts["text_encoder"] for m in trained)
    dataset = make_dataset(cfg, examples, parts, accelerator, text_trains)
    prompts = cfg.validation_prompts or default_prompts(examples)

    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    learning_rate = cfg.learning_rate or DEFAULT_LR[cfg.mode]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps
    )
    *models, optimizer = accelerator.prepare(*trained, optimizer)
    unet = models[0]
    text_encoder = models[1] if text_trains else parts["text_encoder"]
    states = {"lr_scheduler": lr_scheduler, **({"ema": ema} if ema is not None else {})}
    accelerator.register_save_state_pre_hook(keep_trainable_weights)

    first_step = 0
    if resume_from is not None:
        first_step = load_checkpoint(accelerator, resume_from, states)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        accelerator.init_trackers("lesiongen-train", config=tracker_config(cfg))
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg.gradient_accumulation_steps
    if len(examples) < cfg.train_batch_size:
        raise InputError(
            f"--train_batch_size {cfg.train_batch_size}",
            f"is larger than the {len(examples)} training images",
            "lower it",
        )
    sampler = PlannedBatches(
        len(examples),
        cfg.train_batch_size,
        cfg.seed,
        cfg.random_flip,
        cfg.caption_dropout,
        start=first_step * accum,
        rank=rank,
        world=world,
    )
    batches = iter(make_loader(dataset, sampler, cfg.dataloader_num_workers))
    effective_batch = cfg.train_batch_size * accum * world
    if accelerator.is_main_process:
        print(
            f"training {cfg.mode} on {len(examples)} images: {world} process(es), effective batch {effective_batch}, "
            f"steps {first_step}->{cfg.max_train_steps}, lr {learning_rate:g}, {'cached latents' if cfg.cache_latents else 'VAE every step'}"
        )

    bar = tqdm(total=cfg.max_train_steps, initial=first_step, desc="train", disable=not accelerator.is_main_process)
    losses: list[float] = []
    step_seconds: list[float] = []
    tick = time.perf_counter()
    step, micro, step_loss = first_step, first_step * accum, 0.0
    unet.train()
    while step < cfg.max_train_steps:
        batch = next(batches)
        with accelerator.accumulate(*models):
            generator = step_generator(cfg.seed, micro * world + rank, accelerator.device)
            loss = batch_loss(
                batch,
                unet,
                parts["vae"],
                text_encoder,
                parts["noise_scheduler"],
                generator,
                cfg.snr_gamma,
                cfg.noise_offset,
            )
            step_loss += accelerator.gather(loss.detach()).mean().item() / accum
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        if not math.isfinite(step_loss):
            last = latest_checkpoint(out)
            kept = f"kept {last.name}" if last else "no checkpoint was written yet"
            raise InputError(
                f"step {step + 1}",
                f"loss is {step_loss} ({kept}; no model saved)",
                "lower --learning_rate, use --mixed_precision bf16 or no, then --resume_from_checkpoint latest",
            )
        lr_scheduler.step()
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        step += 1
        losses.append(step_loss)
        step_seconds.append(time.perf_counter() - tick)
        accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        step_loss = 0.0
        if step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, cfg, step, {"final_loss": losses[-1], **base}, states)
        if (
            cfg.validation_steps
            and (step % cfg.validation_steps == 0 or step == cfg.max_train_steps)
            and accelerator.is_main_process
        ):
            validate(accelerator, cfg, parts, unet, text_encoder, ema, prompts, step)
        tick = time.perf_counter()
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet, final_text = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        publish(out, lambda tmp: mode.save_result(tmp, parts, final_unet, final_text, ema), mode.published_last)
        record = run_record(
            cfg,
            accelerator,
            step,
            {
                "effective_batch": effective_batch,
                "learning_rate": learning_rate,
                "final_loss": round(losses[-1], 6) if losses else None,
                "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                **base,
            },
        )
        # the base as resolved here, so generation from any folder finds it (and checks its fingerprint)
        write_json(out / "config.json", {**record, "pretrained_model_name_or_path": base["base_model"]})
        write_text(out / "README.md", model_card(cfg, record, examples))
        print(f"saved {cfg.mode} model to {out} after {step} steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, step, losses, step_seconds)


def main(argv: list[str] | None = None) -> int:
    return run(lambda: train(parse_config(TrainConfig, argv, prog="python -m lesiongen.diffusion.train")))


if __name__ == "__main__":
    sys.exit(main())
