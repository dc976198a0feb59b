"""``TrainConfig``: every setting of a diffusion fine-tuning run, checked when the config is built.

Fields are grouped as the README documents them (model, data, optimisation, checkpoints, validation);
``cli.parse_config`` turns them into ``python -m lesiongen.diffusion.train`` flags, and the two launch
scripts only change defaults.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cli import option
from ..errors import InputError
from .families import FAMILIES

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
DEFAULT_LR = {"lora": 5e-6, "full": 1e-5}  # the original train_lora.sh / train_SD.sh
# --torch_compile auto compiles runs of at least this many optimiser steps: on this project's 2-core CPU compiling
# the tiny UNet's LoRA step cost about 110 s more than an eager start with a cold inductor cache (20 s warm) and
# saved 0.058 s a step, so it paid back after about 1,900 steps (350 warm; docs/results.md). The original
# recipe's 15,000-step runs compile; short tests and the demo's 1,300-step runs do not.
COMPILE_AFTER_STEPS = 2000
DEFAULT_TRAIN_STEPS = 15000  # the original train_lora.sh / train_SD.sh, when neither steps nor epochs are given
REPORT_TO = ("tensorboard", "wandb", "none")  # accelerate trackers
# Fields naming a local file or folder: the config.json and card published with a model write them relative to
# the output folder, so a copied or uploaded folder carries no machine path. Hub ids are left as they are.
PATH_FIELDS = (
    "pretrained_model_name_or_path",
    "train_data_dir",
    "dataset_name",
    "output_dir",
    "cache_dir",
    "resume_from_checkpoint",
)
SECRET_FIELDS = ("hub_token",)  # never written to config.json, checkpoints, trackers or the card


@dataclass
class TrainConfig:
    """Fine-tune a Stable Diffusion model on captioned lesion images (LoRA or full UNet with EMA)."""

    # model
    pretrained_model_name_or_path: str = option(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        help="base model: hub id or local pipeline folder (python -m lesiongen.diffusion.tiny builds one)",
    )
    model_family: str | None = option(
        None,
        help="model family; none reads it from the base model's model_index.json",
        choices=tuple(FAMILIES),
    )
    mode: str = option(
        "lora", help="what trains: LoRA adapters on the UNet attention, or the full UNet", choices=("lora", "full")
    )
    rank: int = option(64, help="LoRA rank (lora mode)")
    lora_alpha: float | None = option(None, help="LoRA alpha; none means alpha = rank (scale 1)")
    train_text_encoder: bool = option(
        False,
        help="also train the text encoders, every CLIP one (T5 stays frozen) (full mode; needed when they start random)",
    )
    freeze_token_embedding: bool = option(
        False,
        help="with --train_text_encoder, keep the token embedding (vocabulary x width) fixed: on the tiny demo "
        "model its dense AdamW update was a quarter of each step, and random token vectors are already distinct",
    )
    use_ema: bool = option(False, help="keep an EMA copy of what trains (the UNet, or the LoRA adapters) and save it")
    ema_decay: float = option(0.9999, help="EMA decay")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward to save memory")
    # data
    train_data_dir: str = option(
        "data/captions/train", help="folder with metadata.jsonl (file_name, text), e.g. build_captions OUT/train"
    )
    dataset_name: str | None = option(
        None,
        help="train on a dataset read by datasets.load_dataset (its train split) instead of --train_data_dir: a Hub "
        "dataset id, a local dataset folder (an imagefolder, or python -m lesiongen.diffusion.export's output) "
        "or a parquet file",
    )
    image_column: str = option("image", help="with --dataset_name, the column holding the images")
    caption_field: str | None = option(
        None,
        help="metadata.jsonl field or dataset column to train on; none means the family's: text (CLIP families), "
        "or long_text (T5 families) where the data has it, else text",
        aliases=("--caption_column",),
    )
    resolution: int = option(256, help="training image size (px)")
    center_crop: bool = option(True, help="center crop (false: random crop, which cannot use --cache_latents)")
    random_flip: bool = option(True, help="random horizontal flip")
    caption_dropout: float = option(
        0.0, help="probability of training on the empty caption (for classifier-free guidance)"
    )
    tag_dropout: float = option(
        0.0,
        help="probability of leaving out each comma-separated part of a caption after the first (the diagnosis) "
        "at each step, so the diagnosis alone learns the condition's look; needs the captions encoded every step",
    )
    balance_classes: bool = option(
        False,
        help="draw images class-balanced (weight 1 / class size, the metadata's label column), so rare "
        "conditions get as many updates as common ones",
    )
    cache_latents: bool = option(
        True, help="encode images and captions once and cache them on disk, so a step runs only the UNet"
    )
    cache_dir: str | None = option(None, help="where the latent cache lives (default: OUTPUT_DIR/latent_cache)")
    cache_shard_size: int = option(
        256, help="images per latent-cache shard file; a killed cache build resumes at the last complete shard"
    )
    dataloader_num_workers: int = option(0, help="image decoding workers (uncached path and cache build)")
    # optimisation
    train_batch_size: int = option(1, help="images per process per micro-step")
    gradient_accumulation_steps: int = option(4, help="micro-steps per optimiser step")
    micro_batch_size: str | None = option(
        None,
        help="regroup each process's train_batch_size x gradient_accumulation_steps images per optimiser step "
        "into micro-batches of this size (a divisor), or 'auto': the fastest that fits, found by trial passes. "
        "Every image draws its own noise, so the result is the same for any value; none keeps train_batch_size",
    )
    max_train_steps: int | None = option(
        None,
        help=f"optimiser steps; none means --num_train_epochs passes over the data, or {DEFAULT_TRAIN_STEPS} without "
        "it. Given both, this wins (as in diffusers)",
    )
    num_train_epochs: int | None = option(
        None, help="passes over the training images, when --max_train_steps is not given (diffusers' semantics)"
    )
    learning_rate: float | None = option(None, help="learning rate; none means 5e-6 for lora, 1e-5 for full")
    lr_scheduler: str = option("constant", help="learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, help="warm-up optimiser steps")
    adam_weight_decay: float = option(1e-2, help="AdamW weight decay")
    max_grad_norm: float | None = option(1.0, help="gradient clipping norm; none disables")
    mixed_precision: str = option("no", help="fp16 / bf16 autocast (fp16 needs a GPU)", choices=MIXED_PRECISION)
    torch_compile: str = option(
        "auto",
        help="torch.compile the UNet: faster steps after slow first ones (minutes on a CPU). auto compiles runs of "
        f"at least {COMPILE_AFTER_STEPS} steps, where the compile time pays back (docs/results.md has the measured "
        "figures), on a device with the compiler it needs (a C++ compiler on a CPU, triton on a GPU), and falls back "
        "to eager steps if compiling fails",
        choices=("auto", "true", "false"),
        bare="true",
    )
    allow_tf32: bool = option(True, help="TF32 matrix multiplies in float32 on Ampere and newer GPUs")
    snr_gamma: float | None = option(
        None,
        help="min-SNR loss weighting gamma (5.0 is the paper's value); none disables. With zero terminal SNR "
        "(v-prediction) it weights the near-pure-noise timesteps, which set each image's layout, close to 0",
    )
    noise_offset: float = option(0.0, help="noise offset (0.05-0.1 helps very dark/bright images)")
    seed: int = option(0, help="seed for weights init, data order, flips, noise and timesteps")
    # checkpoints
    output_dir: str = option("outputs/lesiongen-lora", help="where the model, checkpoints, logs and model card go")
    checkpointing_steps: int = option(7500, help="save a resumable checkpoint every N optimiser steps")
    checkpoints_total_limit: int | None = option(None, help="keep at most this many checkpoints; none keeps all")
    resume_from_checkpoint: str | None = option(None, help="'latest' or a checkpoint-<step> folder to continue from")
    # validation and logging
    validation_prompts: list[str] | None = option(
        None, help="prompts for validation images (default: one caption per condition)"
    )
    validation_steps: int = option(500, help="validation images every N steps and at the end; 0 disables")
    validation_inference_steps: int = option(25, help="sampling steps for validation images")
    report_to: str = option(
        "tensorboard",
        help="where to log the loss curve and validation images (an accelerate tracker)",
        choices=REPORT_TO,
    )
    # publishing
    push_to_hub: bool = option(
        False,
        help="at the end, upload the output folder (model, card, sample images, logs; no checkpoints or caches) to "
        "the Hugging Face Hub; log in first (hf auth login, or the HF_TOKEN variable)",
    )
    hub_model_id: str | None = option(
        None, help="Hub repository for --push_to_hub (user/name); none means the output folder's name under your user"
    )
    hub_token: str | None = option(
        None,
        help="Hub token for --push_to_hub; never written anywhere. Prefer hf auth login or HF_TOKEN: a flag is seen by "
        "other users of the machine",
    )

    def __post_init__(self) -> None:
        """Reject impossible combinations when the config is built, so configs made in code are checked too."""
        positive = (
            "rank",
            "resolution",
            "train_batch_size",
            "gradient_accumulation_steps",
            "checkpointing_steps",
            "cache_shard_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name}", f"must be at least 1, got {getattr(self, name)}", "pass a positive integer"
                )
        for name in ("max_train_steps", "num_train_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(
                    f"--{name}", f"must be at least 1, got {getattr(self, name)}", "pass a positive integer"
                )
        if self.resolution % 8:
            raise InputError(
                "--resolution",
                f"{self.resolution} is not a multiple of 8",
                "the VAE downsamples by 4 or 8; use e.g. 64, 256, 512",
            )
        per_step = self.train_batch_size * self.gradient_accumulation_steps
        if self.micro_batch_size not in (None, "auto") and not (
            str(self.micro_batch_size).isdigit()
            and int(self.micro_batch_size) >= 1
            and per_step % int(self.micro_batch_size) == 0
        ):
            raise InputError(
                f"--micro_batch_size {self.micro_batch_size}",
                f"does not divide the {per_step} images per step (train_batch_size x gradient_accumulation_steps)",
                "pass a divisor of that number, auto, or none",
            )
        if self.freeze_token_embedding and not self.train_text_encoder:
            raise InputError(
                "--freeze_token_embedding", "needs --train_text_encoder", "drop it: the text encoder is frozen already"
            )
        if self.train_text_encoder and self.mode != "full":
            raise InputError("--train_text_encoder", "needs --mode full", "drop it, or train with --mode full")
        if self.cache_latents and not self.center_crop:
            raise InputError("--center_crop false", "random crops cannot be cached", "add --cache_latents false")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise InputError("--caption_dropout", f"{self.caption_dropout} is not in [0, 1)", "e.g. 0.1")
        if not 0.0 <= self.tag_dropout < 1.0:
            raise InputError("--tag_dropout", f"{self.tag_dropout} is not in [0, 1)", "e.g. 0.3")
        if self.tag_dropout and self.cache_latents and not self.train_text_encoder:
            raise InputError(
                "--tag_dropout",
                "varies each caption per step, but --cache_latents encodes the captions of frozen text encoders once",
                "add --cache_latents false, or train the text encoder too (--mode full --train_text_encoder)",
            )
        # the comparisons are written so that nan and inf fail them too (configs built in code skip the CLI's check)
        if self.learning_rate is not None and not 0 < self.learning_rate < float("inf"):
            raise InputError("--learning_rate", "must be a positive number", "e.g. 1e-4 for LoRA")
        if self.snr_gamma is not None and not 0 < self.snr_gamma < float("inf"):
            raise InputError("--snr_gamma", "must be a positive number", "5.0 is the min-SNR paper's value, or none")
        if not 0 <= self.noise_offset < float("inf"):
            raise InputError("--noise_offset", "must be a number >= 0", "e.g. 0.05")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise InputError("--checkpoints_total_limit", "must be at least 1", "or none to keep all")
        if self.dataloader_num_workers < 0:
            raise InputError("--dataloader_num_workers", "must be 0 or more", "0 decodes images in this process")
        if self.validation_steps < 0:
            raise InputError("--validation_steps", "must be >= 0", "0 disables validation")
        if self.hub_token is not None and self.report_to == "wandb":
            raise InputError(
                "--hub_token",
                "would be recorded by wandb, which logs the command line",
                "log in with hf auth login (or set HF_TOKEN) and drop --hub_token",
            )
        if self.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise InputError(
                "--report_to wandb",
                "wandb is not installed",
                "pip install wandb (then wandb login), or pass --report_to tensorboard",
            )
        if (self.hub_model_id or self.hub_token) and not self.push_to_hub:
            flag = "--hub_model_id" if self.hub_model_id else "--hub_token"
            raise InputError(flag, "is used only with --push_to_hub", "add --push_to_hub, or drop it")


def total_steps(cfg: TrainConfig, n_images: int, world: int) -> int:
    """Optimiser steps of the run, as diffusers' train_text_to_image.py derives them: ``--max_train_steps`` when
    given, else ``--num_train_epochs`` x steps per epoch (each process's share of the images in batches, then
    accumulated), else ``DEFAULT_TRAIN_STEPS``."""
    if cfg.max_train_steps is not None:
        return cfg.max_train_steps
    if cfg.num_train_epochs is None:
        return DEFAULT_TRAIN_STEPS
    batches_per_process = math.ceil(n_images / (cfg.train_batch_size * world))
    return cfg.num_train_epochs * math.ceil(batches_per_process / cfg.gradient_accumulation_steps)


def recorded_fields(cfg: TrainConfig) -> dict:
    """The config as runs record it (config.json, checkpoints, trackers): every field but the secrets."""
    return {k: v for k, v in asdict(cfg).items() if k not in SECRET_FIELDS}


def portable_fields(cfg: TrainConfig, out: Path) -> dict:
    """``recorded_fields`` with local paths relative to the output folder ``out`` (hub ids and names kept), for the
    config.json and card that travel with the model."""
    fields = recorded_fields(cfg)
    for name in PATH_FIELDS:
        fields[name] = portable_path(fields[name], out)
    return fields


def portable_path(value: str | None, out: Path) -> str | None:
    """A local path written relative to ``out``; anything else (a hub id, none) unchanged."""
    if value is None or not Path(value).expanduser().exists():
        return value
    return Path(os.path.relpath(Path(value).expanduser().resolve(), Path(out).resolve())).as_posix()
