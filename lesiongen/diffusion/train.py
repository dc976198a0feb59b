"""Fine-tune a diffusion model of any family on lesion captions: LoRA or full UNet (+EMA), one loop, driven by accelerate.

    accelerate launch -m lesiongen.diffusion.train --mode lora --pretrained_model_name_or_path MODEL \\
        --train_data_dir CAPTIONS/train --output_dir OUT

``train_lora.sh`` and ``train_SD.sh`` call this with the original LesionGen defaults. The two modes
differ only in the two helpers of ``MODES`` (what trains, how the result is saved; an EMA copy follows
whatever trains); model families (``families/``) differ only in what they load, how captions become the UNet's
conditioning and which pipeline class validates and saves; everything else is the same loop.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..cli import run_stage
from ..devices import adamw, compile_choice
from ..errors import InputError
from ..files import write_json, write_text
from . import families
from .checkpoints import (
    find_resume_checkpoint,
    keep_trainable_weights,
    latest_checkpoint,
    load_checkpoint,
    publish,
    remove_stale_temporaries,
    run_record,
    save_checkpoint,
)
from .config import (
    COMPILE_AFTER_STEPS,
    DEFAULT_LR,
    TrainConfig,
    portable_fields,
    portable_path,
    recorded_fields,
    total_steps,
)
from .hub import model_card, push_to_hub, write_samples
from .loss import batch_loss, diffusion_loss
from .micro_batch import pick_micro_batch
from .validation import default_prompts, ema_parameters, on_device, validate

__all__ = ["TrainConfig", "TrainResult", "batch_loss", "diffusion_loss", "main", "train"]
# Step losses are read back from the device (one host sync) this often, and before every checkpoint,
# validation and the final save, so steps queue up on a GPU instead of waiting for the host.
LOSS_READ_EVERY = 25


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimiser step run by this call
    # Wall time of each of those steps (benchmarks). On a GPU steps run ahead of the host between loss
    # reads, so only sums up to a read (every LOSS_READ_EVERY steps and the last step) are meaningful.
    step_seconds: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# The helpers in which LoRA and full training differ


def family_modules(parts: dict) -> list[str]:
    """Names of the family's modules with weights: the denoiser ("unet"), the VAE and every text encoder."""
    return ["unet", "vae", *parts["family"].text_encoders]


def lora_trainable(parts: dict, cfg: TrainConfig) -> list:
    """LoRA: only the adapters on the UNet attention projections train; everything else is frozen."""
    from .pipeline import add_lora

    for name in family_modules(parts):
        parts[name].requires_grad_(False)
    add_lora(parts["unet"], cfg.rank, cfg.lora_alpha, seed=cfg.seed, family=parts["family"])
    return [parts["unet"]]


def full_trainable(parts: dict, cfg: TrainConfig) -> list:
    """Full: the whole UNet trains, and with --train_text_encoder every CLIP text encoder (T5 stays frozen)."""
    for name in family_modules(parts):
        parts[name].requires_grad_(False)
    parts["unet"].requires_grad_(True)
    texts = parts["family"].trainable_text_encoders if cfg.train_text_encoder else ()
    for name in texts:
        parts[name].requires_grad_(True)
        if cfg.freeze_token_embedding:
            parts[name].get_input_embeddings().requires_grad_(False)
    return [parts["unet"], *(parts[n] for n in texts)]


def make_ema(unet, cfg: TrainConfig):
    """An EMA copy of what trains in the UNet (all of it, or the LoRA adapters), only with --use_ema."""
    if not cfg.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(ema_parameters(unet), decay=cfg.ema_decay)


def save_lora_result(out: Path, parts: dict, unet, text_encoders: dict, ema) -> None:
    """LoRA weights (the EMA's with --use_ema) in the diffusers format ``pipe.load_lora_weights(dir)`` reads,
    and their copy for A1111/ComfyUI."""
    from .pipeline import save_lora

    if ema is not None:
        ema.copy_to(ema_parameters(unet))
    save_lora(unet, unet.peft_config["default"], out, parts["family"])


def save_full_result(out: Path, parts: dict, unet, text_encoders: dict, ema) -> None:
    """A complete pipeline folder with the EMA weights swapped in, for ``from_pretrained``."""
    import torch

    from .pipeline import assemble_pipeline

    if ema is not None:
        ema.copy_to(ema_parameters(unet))
    text_encoders = {name: module.to(torch.float32) for name, module in text_encoders.items()}
    assemble_pipeline(parts, unet.to(torch.float32), text_encoders).save_pretrained(out)


@dataclass(frozen=True)
class Mode:
    trainable: Callable  # (parts, cfg) -> modules whose parameters train
    save_result: Callable  # (folder, parts, unet, {name: text encoder}, ema) -> None
    published_last: str  # the file whose presence marks the saved result complete


MODES = {
    "lora": Mode(lora_trainable, save_lora_result, "pytorch_lora_weights.safetensors"),
    "full": Mode(full_trainable, save_full_result, "model_index.json"),
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


# torch's attention kernels, one per device and backend, as dispatched by F.scaled_dot_product_attention
ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def checkpoint_keeping_attention(module, *args):
    """Gradient checkpointing that keeps each attention's output and recomputes the rest of the block.

    An attention kernel's output is the size of its input (it never stores the tokens x tokens scores), so
    keeping it costs little memory, while recomputing it was the costliest part of the recomputation: with a
    compiled UNet the tiny model's LoRA step took 0.080 s against 0.093 s recomputing everything (no
    checkpointing: 0.076 s) on one CPU core. Used with ``torch.compile`` only: in eager mode, where the policy
    runs at every op, it saved nothing measurable.
    """
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    return checkpoint(
        module.__call__,
        *args,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, keep_attention),
    )


@functools.cache
def attention_ops() -> frozenset:
    """The aten overloads of ``ATTENTION_OPS`` this torch build has, looked up once per process."""
    import torch

    aten = torch.ops.aten
    return frozenset(getattr(aten, name).default for name in ATTENTION_OPS if hasattr(aten, name))


def keep_attention(ctx, op, *args, **kwargs):
    """The selective-checkpointing policy of ``checkpoint_keeping_attention``: save attention, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def place_models(parts: dict, trained: list, accelerator, gradient_checkpointing: bool, compiled: bool) -> None:
    """Frozen weights go to the device in the compute dtype; trainable ones (and LoRA adapters) stay float32."""
    import torch
    from diffusers.training_utils import cast_training_params

    dtype = weight_dtype(accelerator)
    for name in family_modules(parts):
        module = parts[name]
        fully_trained = any(module is m for m in trained) and all(p.requires_grad for p in module.parameters())
        target = torch.float32 if fully_trained else dtype
        module.to(accelerator.device)
        if module.dtype != target:
            module.to(dtype=target)
    for module in trained:  # what trains inside a cast module (LoRA adapters, all but a frozen embedding)
        cast_training_params(module, dtype=torch.float32)
    if gradient_checkpointing:
        parts["unet"].enable_gradient_checkpointing(checkpoint_keeping_attention if compiled else None)
        for text_encoder in trained[1:]:
            text_encoder.gradient_checkpointing_enable()


def make_dataset(cfg: TrainConfig, examples, parts: dict, accelerator, text_trains: bool):
    """Cached latents (and frozen text embeddings) when allowed, else images decoded every step."""
    from .dataset import ImageCaptionDataset
    from .latent_cache import open_cache

    if not cfg.cache_latents:
        tokenizers = [parts[n] for n in parts["family"].tokenizers]
        return ImageCaptionDataset(examples, tokenizers, cfg.resolution, cfg.center_crop, cfg.tag_dropout, cfg.seed)
    return open_cache(
        cfg, examples, parts, accelerator, with_text=not text_trains, embed_dtype=weight_dtype(accelerator)
    )


def release_encoders(parts: dict, cfg: TrainConfig, text_trains: bool) -> list:
    """Move what the cache made unnecessary off the accelerator before the first step: the frozen text
    encoders (T5-XXL alone is about 9 GB in bf16) and the VAE. Validation borrows them back (``on_device``).
    Returns the released modules."""
    if not cfg.cache_latents:
        return []
    released = [parts["vae"]] + ([] if text_trains else [parts[n] for n in parts["family"].text_encoders])
    for module in released:
        module.to("cpu")
    return released


def use_fast_math(cfg: TrainConfig, device) -> None:
    """TF32 matmuls on Ampere+ GPUs: float32 training at tensor-core speed, within float32 training noise."""
    import torch

    if device.type == "cuda" and cfg.allow_tf32:
        torch.set_float32_matmul_precision("high")


class LossReader:
    """Step losses kept on the device and read in one host sync every ``LOSS_READ_EVERY`` steps (or on demand)."""

    def __init__(self, accelerator):
        self.accelerator, self.pending, self.lrs = accelerator, [], []

    def add(self, loss, lr: float) -> None:
        self.pending.append(loss)
        self.lrs.append(lr)

    def read(self) -> list[tuple[float, float]]:
        """(mean loss over processes, learning rate) of each step since the last read."""
        import torch

        if not self.pending:
            return []
        losses = self.accelerator.gather(torch.stack(self.pending)[None]).mean(0).tolist()
        out = list(zip(losses, self.lrs, strict=True))
        self.pending, self.lrs = [], []
        return out


def tracker_config(cfg: TrainConfig) -> dict:
    """TensorBoard hparams accept only scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in recorded_fields(cfg).items()}


# ---------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig) -> TrainResult:
    """Set up, resume, run the optimiser steps (``config.total_steps``), checkpoint, validate, save the result."""
    import torch
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .attention import pad_cross_attention_keys
    from .dataset import PlannedBatches, class_balanced_weights, make_loader
    from .pipeline import base_identity, load_training_parts
    from .train_data import load_examples

    accelerator = make_accelerator(cfg)
    out = Path(cfg.output_dir)
    resume_from = find_resume_checkpoint(cfg)
    mode = MODES[cfg.mode]
    use_fast_math(cfg, accelerator.device)

    parts = load_training_parts(cfg.pretrained_model_name_or_path, cfg.model_family)
    family = parts["family"]
    # after loading, so a hub model is in the cache
    base = {**base_identity(cfg.pretrained_model_name_or_path), "model_family": family.name}
    if cfg.snr_gamma is not None and family.objective != "ddpm":
        raise InputError(
            "--snr_gamma",
            f"weights DDPM timesteps by their SNR; {family.name} trains with rectified flow",
            "drop it (the family's own timestep density and weighting apply)",
        )
    if cfg.snr_gamma is not None and parts["noise_scheduler"].config.get("rescale_betas_zero_snr"):
        print(
            f"note: --snr_gamma {cfg.snr_gamma} with a zero-terminal-SNR schedule weights the noisiest timesteps "
            "(where the layout is drawn) near 0; on the demo it cut recognisability from 0.50 to 0.29 (docs/results.md)"
        )
    examples, caption_field = load_examples(cfg, parts)
    max_steps = total_steps(cfg, len(examples), accelerator.num_processes)
    if cfg.num_train_epochs is not None and cfg.max_train_steps is not None and accelerator.is_main_process:
        print(f"note: --max_train_steps {cfg.max_train_steps} wins over --num_train_epochs {cfg.num_train_epochs}")
    compiled, why_compiled = compile_choice(
        cfg.torch_compile, max_steps, COMPILE_AFTER_STEPS, "steps", accelerator.device
    )
    torch.manual_seed(cfg.seed)
    trained = mode.trainable(parts, cfg)
    place_models(parts, trained, accelerator, cfg.gradient_checkpointing, compiled)
    ema = make_ema(parts["unet"], cfg)
    if ema is not None:
        ema.to(accelerator.device)
    text_trains = len(trained) > 1  # the UNet first, then any text encoders
    dataset = make_dataset(cfg, examples, parts, accelerator, text_trains)
    released = release_encoders(parts, cfg, text_trains)
    prompts = cfg.validation_prompts or default_prompts(examples)

    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    learning_rate = cfg.learning_rate or DEFAULT_LR[cfg.mode]
    optimizer = adamw(params, accelerator.device, lr=learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=max_steps
    )
    *models, optimizer = accelerator.prepare(*trained, optimizer)
    unet = models[0]
    trained_text = [n for n in family.text_encoders if any(parts[n] is m for m in trained)]
    # every text encoder by name, the trained ones as accelerate wrapped them (family order is kept)
    text_encoders = {n: parts[n] for n in family.text_encoders} | dict(zip(trained_text, models[1:], strict=True))
    states = {"lr_scheduler": lr_scheduler, **({"ema": ema} if ema is not None else {})}
    accelerator.register_save_state_pre_hook(keep_trainable_weights)

    first_step = 0
    if resume_from is not None:
        first_step = load_checkpoint(accelerator, resume_from, states)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        accelerator.init_trackers("lesiongen-train", config=tracker_config(cfg))
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps  # images per process per optimiser step
    if len(examples) < cfg.train_batch_size:
        raise InputError(
            f"--train_batch_size {cfg.train_batch_size}",
            f"is larger than the {len(examples)} training images",
            "lower it",
        )
    plan = (len(examples), per_step, 1, cfg.seed, cfg.random_flip, cfg.caption_dropout)

    predict = families.denoiser(family, list(text_encoders.values()), parts["vae"])

    def run_loss(batch, model=unet):
        return batch_loss(
            batch,
            model,
            parts["vae"],
            predict,
            parts["noise_scheduler"],
            cfg.seed,
            cfg.snr_gamma,
            cfg.noise_offset,
        )

    weights = class_balanced_weights(examples) if cfg.balance_classes else None
    trial_sampler = PlannedBatches(*plan, start_step=first_step, rank=rank, world=world, weights=weights)
    micro = pick_micro_batch(cfg, per_step, dataset, trial_sampler, run_loss, unet, params, accelerator)
    accum = per_step // micro
    accelerator.gradient_accumulation_steps = accum
    sampler = PlannedBatches(
        *plan[:2], micro, *plan[3:], start_step=first_step, rank=rank, world=world, weights=weights
    )
    batches = iter(make_loader(dataset, sampler, cfg.dataloader_num_workers))
    if compiled:  # on a CPU the compiled step pads the text keys too (attention.py); eager keeps diffusers' rounding
        pad_cross_attention_keys(unet, accelerator.device)
    step_unet = torch.compile(unet) if compiled else unet  # validation and saving keep the eager module
    effective_batch = per_step * world
    if accelerator.is_main_process:
        print(
            f"training {cfg.mode} on {len(examples)} images: {world} process(es), effective batch {effective_batch} "
            f"({micro} x {accum} accumulation per process), steps {first_step}->{max_steps}, "
            f"lr {learning_rate:g}, {'cached latents' if cfg.cache_latents else 'VAE every step'}, "
            f"torch.compile {'on' if compiled else 'off'} ({why_compiled})"
        )

    bar = tqdm(total=max_steps, initial=first_step, desc="train", disable=not accelerator.is_main_process)
    losses: list[float] = []
    step_seconds: list[float] = []
    reader = LossReader(accelerator)

    def read_losses() -> None:
        """Log the steps since the last read; a non-finite loss stops the run before anything is saved."""
        for value, lr in reader.read():
            losses.append(value)
            n = first_step + len(losses)
            if not math.isfinite(value):
                last = latest_checkpoint(out)
                kept = f"kept {last.name}" if last else "no checkpoint was written yet"
                raise InputError(
                    f"step {n}",
                    f"loss is {value} ({kept}; no model saved)",
                    "lower --learning_rate, use --mixed_precision bf16 or no, then --resume_from_checkpoint latest",
                )
            accelerator.log({"loss": value, "lr": lr}, step=n)
        if losses:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")

    tick = time.perf_counter()
    step, step_loss = first_step, None
    unet.train()
    samples: list = []  # the last validation's images, the card's samples
    while step < max_steps:
        batch = next(batches)
        with accelerator.accumulate(*models):
            loss = run_loss(batch, step_unet)
            step_loss = loss.detach() / accum if step_loss is None else step_loss + loss.detach() / accum
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        lr_scheduler.step()
        if ema is not None:
            ema.step(ema_parameters(accelerator.unwrap_model(unet)))
        step += 1
        reader.add(step_loss, lr_scheduler.get_last_lr()[0])
        step_loss = None
        checkpoint_due = step % cfg.checkpointing_steps == 0
        validation_due = cfg.validation_steps and (step % cfg.validation_steps == 0 or step == max_steps)
        if checkpoint_due or validation_due or step % LOSS_READ_EVERY == 0 or step == max_steps:
            read_losses()
        bar.update(1)  # after a loss read, so on a GPU the bar's last update waits for the last step to finish
        if checkpoint_due:
            save_checkpoint(accelerator, cfg, step, {"final_loss": losses[-1], **base}, states)
        if validation_due and accelerator.is_main_process:
            with on_device(released, accelerator.device):
                samples = validate(accelerator, cfg, parts, unet, text_encoders, ema, prompts, step)
        step_seconds.append(time.perf_counter() - tick)
        tick = time.perf_counter()
    read_losses()
    bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        final_text = {n: accelerator.unwrap_model(m) for n, m in text_encoders.items()}
        publish(out, lambda tmp: mode.save_result(tmp, parts, final_unet, final_text, ema), mode.published_last)
        record = run_record(
            cfg,
            accelerator,
            step,
            {
                "effective_batch": effective_batch,
                "micro_batch": micro,
                "learning_rate": learning_rate,
                "final_loss": round(losses[-1], 6) if losses else None,
                "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "caption_field": caption_field,
                **base,
            },
        )
        # the base relative to this folder (or its hub id), so generation from any folder, or from a copy of both,
        # finds it (and checks its fingerprint); no machine path is written into the folder
        portable_base = portable_path(base["base_model"], out)
        record |= {"config": portable_fields(cfg, out), "base_model": portable_base}
        write_json(out / "config.json", {**record, "pretrained_model_name_or_path": portable_base})
        widget = write_samples(out, prompts, samples) if samples else []
        write_text(out / "README.md", model_card(cfg, record, examples, widget, out))
        print(f"saved {cfg.mode} model to {out} after {step} steps")
        if cfg.push_to_hub:
            push_to_hub(cfg, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(out, step, losses, step_seconds)


def main(argv: list[str] | None = None) -> int:
    prog, reads = "python -m lesiongen.diffusion.train", ("pretrained_model_name_or_path", "train_data_dir")
    return run_stage(train, TrainConfig, argv, prog, "diffusion training", reads=reads, tables=("train_data_dir",))


if __name__ == "__main__":
    sys.exit(main())
