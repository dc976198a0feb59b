"""Build a Stable-Diffusion-architecture pipeline from configs, with random weights, saved like SD.

No model hub is reachable from tests, the demo or a user's first run, so the default model is built
here: the same classes Stable Diffusion 1.x uses (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
the real CLIP BPE tokenizer, a PNDM scheduler) saved with ``save_pretrained`` and loaded back through
``StableDiffusionPipeline.from_pretrained(dir, safety_checker=None)`` exactly as a downloaded model is.

``size="tiny"`` (about 5 M parameters, 64 px in 16x16 latents) trains on a CPU; ``size="sd1"`` has
SD-1.x's real shapes (random weights) for GPU speed and memory measurements.

    python -m lesiongen.diffusion.tiny --output_dir models/tiny-sd [--resolution 64] [--seed 0] [--size tiny|sd1]
        [--latent_channels 8] [--norm_groups 8] [--attention_heads 2 4] [--zero_snr]
        [--family sd1|sd2|sdxl|sd3|flux]

``--family`` builds another family's structure on the same shapes (``families/<name>.py`` says how it
differs), saved with that family's pipeline class.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..cli import option, run_stage
from ..errors import InputError
from ..files import atomic_dir
from ..tokens import CLIP_MAX_TOKENS, write_tokenizer_files
from .families import FAMILIES

CLIP_VOCAB_SIZE = 49408
CLIP_BOS, CLIP_EOS = 49406, 49407

# Per-size shapes. "tiny" follows TOOLCHAIN.md (measured ~0.1 s per batch-4 LoRA step at 64 px on one core);
# "sd1" copies stable-diffusion-v1-5/stable-diffusion-v1-5's unet/vae/text_encoder config.json values.
SIZES: dict[str, dict] = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            scaling_factor=1.0,  # a random x4 VAE gives latents of std ~1.0 (measured); SD's 0.18215 would shrink them
        ),
        "text": dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, projection_dim=64
        ),
        "downsample": 4,
    },
    "sd1": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            scaling_factor=0.18215,
        ),
        "text": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
        ),
        "downsample": 8,
    },
}


@dataclass
class TinyConfig:
    """Build and save a Stable-Diffusion-architecture pipeline with random weights (no download)."""

    output_dir: str = option(help="output folder (a diffusers pipeline directory)", aliases=("--out",))
    resolution: int = option(64, help="image size the UNet is configured for (sample_size = resolution / downsampling)")
    seed: int = option(0, help="seed for the random weights")
    size: str = option(
        "tiny", help="tiny (CPU tests, demo) or sd1 (SD-1.x shapes, for GPU benchmarks)", choices=tuple(SIZES)
    )
    latent_channels: int | None = option(None, help="VAE latent channels (the UNet follows); none: the size's 4")
    norm_groups: int | None = option(
        None,
        help="GroupNorm groups in the VAE and UNet; none: the size's 32 (on the tiny model's 32-channel blocks "
        "that is per-channel normalisation, which discards each image's colour balance)",
    )
    attention_heads: list[int] | None = option(
        None,
        help="attention heads per UNet block (one number, or one per block); none: the size's 8. The tiny UNet's "
        "32- and 64-channel blocks split into 8 heads of 4 and 8 channels; 2 and 4 heads of 16 took 0.139 s "
        "per training step against 0.191 (batch 8, one core), the same parameters",
    )
    zero_snr: bool = option(
        False,
        help="v-prediction, zero terminal SNR and trailing timesteps (Lin et al. 2024): with the default "
        "schedule small latents keep their mean colour at the last timestep, so samples took it from the noise",
    )
    family: str = option(
        "sd1", help="model family whose structure and pipeline class to build", choices=tuple(FAMILIES)
    )

    def __post_init__(self) -> None:
        out = Path(self.output_dir)
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise InputError(
                f"--output_dir {out}",
                "already exists, and a model built here would replace it (random weights over a trained model)",
                "choose a new --output_dir, or remove this one first",
            )
        step = SIZES[self.size]["downsample"]
        if self.resolution <= 0 or self.resolution % (step * 2) != 0:
            raise InputError(
                "--resolution", f"{self.resolution} is not a positive multiple of {step * 2}", f"use e.g. {step * 16}"
            )
        widths = SIZES[self.size]["unet"]["block_out_channels"] + SIZES[self.size]["vae"]["block_out_channels"]
        if self.norm_groups is not None and (self.norm_groups < 1 or any(w % self.norm_groups for w in widths)):
            raise InputError(
                f"--norm_groups {self.norm_groups}", f"does not divide the block widths {sorted(set(widths))}", "e.g. 8"
            )
        if self.latent_channels is not None and self.latent_channels < 1:
            raise InputError("--latent_channels", f"{self.latent_channels} is not positive", "e.g. 4 or 8")
        if self.attention_heads is not None:
            blocks = SIZES[self.size]["unet"]["block_out_channels"]
            heads = per_block(self.attention_heads, len(blocks))
            if len(heads) != len(blocks) or any(h < 1 or w % h for h, w in zip(heads, blocks, strict=True)):
                raise InputError(
                    f"--attention_heads {' '.join(map(str, self.attention_heads))}",
                    f"is not one positive divisor of each of the UNet's block widths {list(blocks)}",
                    "e.g. 2 4, or 8",
                )


def per_block(values: list[int] | tuple[int, ...], blocks: int) -> tuple[int, ...]:
    """One value for every block, or the values given per block (left as they are, for the caller to check)."""
    return tuple(values) * blocks if len(values) == 1 else tuple(values)


# The shape the demo and the Derm7pt experiment build (docs/results.md says why): 8 latent channels,
# GroupNorm over 4 channels of the tiny blocks, zero terminal SNR with v-prediction.
SMALL_DATA_SHAPE = {"latent_channels": 8, "norm_groups": 8, "zero_snr": True}
# The scheduler entries --zero_snr sets; DDPM (training) and DDIM/DPM-Solver (sampling) read them from the config.
ZERO_SNR = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def build_components(
    resolution: int = 64,
    seed: int = 0,
    size: str = "tiny",
    latent_channels: int | None = None,
    norm_groups: int | None = None,
    zero_snr: bool = False,
    attention_heads: list[int] | tuple[int, ...] | None = None,
) -> dict:
    """The five pipeline components with seeded random weights, as ``StableDiffusionPipeline(**parts)`` takes them."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    shapes = SIZES[size]
    groups = {"norm_num_groups": norm_groups} if norm_groups else {}
    # diffusers' UNet2DConditionModel reads its head count from ``attention_head_dim`` (a historical name)
    blocks = len(shapes["unet"]["block_out_channels"])
    heads = {"attention_head_dim": per_block(attention_heads, blocks)} if attention_heads else {}
    vae_shapes = {**shapes["vae"], **groups, **({"latent_channels": latent_channels} if latent_channels else {})}
    latent = vae_shapes["latent_channels"]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // shapes["downsample"],
        in_channels=latent,
        out_channels=latent,
        **{**shapes["unet"], **groups, **heads},
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, sample_size=resolution, **vae_shapes)
    text_config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_TOKENS,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,  # pooled output is read at the real end token (TOOLCHAIN.md)
        pad_token_id=1,
        hidden_act="quick_gelu",
        **shapes["text"],
    )
    text_encoder = CLIPTextModel(text_config)
    # SD 1.x's scheduler config; PNDMScheduler rejects clip_sample as an argument, and a DDPMScheduler loaded
    # from this config for training would otherwise default to clip_sample=True.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    scheduler.register_to_config(clip_sample=False, **(ZERO_SNR if zero_snr else {}))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def build_tiny_pipeline(
    out_dir: str | Path, resolution: int = 64, seed: int = 0, size: str = "tiny", family: str = "sd1", **shape
) -> Path:
    """Save a complete pipeline directory (written under a temporary name, renamed when complete).

    ``shape`` takes ``build_components``' keyword options (latent_channels, norm_groups, zero_snr, attention_heads).
    """
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    fam = FAMILIES[family]
    parts = build_components(resolution, seed, size, **shape)
    with atomic_dir(out_dir) as tmp:
        write_tokenizer_files(tmp / "tokenizer_src")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer_src", model_max_length=CLIP_MAX_TOKENS)
        parts = fam.tiny({**parts, "tokenizer": tokenizer}, seed)
        fam.pipeline_class()(**parts, **fam.pipeline_extras).save_pretrained(tmp)
        # Keep the original vocab.json/merges.txt beside tokenizer.json so slow and fast loaders both work.
        clip_folders = [p.tokenizer for p in fam.text_parts if p.tokenizer_class == "CLIPTokenizer"]
        for f in (tmp / "tokenizer_src").iterdir():
            for name in clip_folders:
                target = tmp / name / f.name
                if not target.exists():
                    target.write_bytes(f.read_bytes())
            f.unlink()
        (tmp / "tokenizer_src").rmdir()
    return out_dir


def build(cfg: TinyConfig) -> Path:
    out = build_tiny_pipeline(
        cfg.output_dir,
        cfg.resolution,
        cfg.seed,
        cfg.size,
        cfg.family,
        latent_channels=cfg.latent_channels,
        norm_groups=cfg.norm_groups,
        zero_snr=cfg.zero_snr,
        attention_heads=cfg.attention_heads,
    )
    print(f"wrote {cfg.size} {cfg.family} pipeline ({cfg.resolution} px) to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_stage(build, TinyConfig, argv, "python -m lesiongen.diffusion.tiny", "diffusion training")


if __name__ == "__main__":
    sys.exit(main())
