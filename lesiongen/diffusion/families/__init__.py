"""The model families one training loop fine-tunes: what each supplies that the others do not.

A ``Family`` entry (``base.py``) names its diffusers pipeline class, its tokenizer/text-encoder pairs, how
token ids become the denoiser's conditioning and prediction, its training objective, which modules LoRA
adapts, its native resolution and how its tiny offline build differs from SD 1.x's. Everything else
(data, noise, optimiser, checkpoints, resume, EMA, validation, generation) is shared. The family is read
from the base model's ``model_index.json``; ``--model_family`` overrides it. Adding a family is one
module and one ``FAMILIES`` entry.
"""

from __future__ import annotations

from ...errors import InputError
from . import flux, sd, sd3, sdxl
from .base import Family, denoiser, ids_key, kohya_state_dict, prompt_encoder, tokenize, vae_scale_factor

__all__ = [
    "FAMILIES",
    "Family",
    "denoiser",
    "detect_family",
    "ids_key",
    "kohya_state_dict",
    "load_parts",
    "model_index",
    "prompt_encoder",
    "tokenize",
    "vae_scale_factor",
]

FAMILIES: dict[str, Family] = {f.name: f for f in (sd.SD1, sd.SD2, sdxl.SDXL, sd3.SD3, flux.FLUX)}
# The scheduler a training objective draws noise levels from, loaded from the model's scheduler config.
NOISE_SCHEDULERS = {"ddpm": "DDPMScheduler", "flow": "FlowMatchEulerDiscreteScheduler"}


def model_index(source: str) -> dict:
    """A pipeline's ``model_index.json`` (local folder or hub id) as a dict."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(source))


def detect_family(source: str, override: str | None = None, flag: str = "--pretrained_model_name_or_path") -> Family:
    """The family named by ``override`` (``--model_family``), else the one whose entry matches the model's index."""
    if override is not None:
        if override not in FAMILIES:
            raise InputError("--model_family", f"unknown family '{override}'", f"choose one of {', '.join(FAMILIES)}")
        return FAMILIES[override]
    index = model_index(source)
    found = [f for f in FAMILIES.values() if f.matches(index, source)]
    if not found:
        raise InputError(
            f"{flag} {source}",
            f"its model_index.json names {index.get('_class_name')!r}, which no model family here trains",
            f"pass --model_family ({', '.join(FAMILIES)}) if it is one of them",
        )
    return found[0]


def load_parts(source: str, family: Family) -> dict:
    """The family's tokenizers and text encoders, the VAE, the denoiser (under "unet") and the noise scheduler
    of its training objective, each from its subfolder of ``source``."""
    import diffusers
    import transformers

    parts: dict = {"family": family}
    for p in family.text_parts:
        tokenizer = getattr(transformers, p.tokenizer_class)
        parts[p.tokenizer] = tokenizer.from_pretrained(source, subfolder=p.tokenizer)
        if p.max_length is not None:
            parts[p.tokenizer].model_max_length = p.max_length
        parts[p.encoder] = getattr(transformers, p.encoder_class).from_pretrained(source, subfolder=p.encoder)
    parts["vae"] = diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae")
    parts["unet"] = getattr(diffusers, family.denoiser_class).from_pretrained(source, subfolder=family.denoiser)
    noise_scheduler = getattr(diffusers, NOISE_SCHEDULERS[family.objective])
    parts["noise_scheduler"] = noise_scheduler.from_pretrained(source, subfolder="scheduler")
    return parts
