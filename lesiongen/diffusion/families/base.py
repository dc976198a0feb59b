"""What a model family is (``Family``), and the family-independent helpers every entry uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Batch keys of where each training frame came from: the file's (height, width) and the crop's (top, left).
FRAMING = ("original_size", "crop_top_left")


@dataclass(frozen=True)
class TextPart:
    """One tokenizer and the text encoder that reads its ids, by pipeline component name and class."""

    tokenizer: str
    encoder: str
    tokenizer_class: str
    encoder_class: str
    max_length: int | None = None  # tokens the family's pipeline encodes (T5); none: the tokenizer's own limit


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str  # diffusers pipeline class: validation, generation, LoRA save/load, the model card
    image_pipeline: str  # its image-to-image form (generate.py --mode edit/augment), built from the loaded one
    text_parts: tuple[TextPart, ...]
    # (text encoders, token ids per tokenizer) -> named embeddings; the latent cache stores each name
    encode: Callable[[list, list], dict]
    embed_names: tuple[str, ...]
    # (denoiser, noisy latents, timesteps, embeddings and FRAMING, VAE downscale factor) -> the denoiser's prediction
    predict: Callable
    native_resolution: int
    # (index, source) -> True when a model_index.json (and the model's configs) are this family's
    matches: Callable[[dict, str], bool]
    # (SD-1.x-style parts built by tiny.py, seed) -> this family's pipeline components
    tiny: Callable[[dict, int], dict]
    denoiser: str = "unet"  # pipeline component (and folder) of the denoiser; training code calls it "unet"
    denoiser_class: str = "UNet2DConditionModel"
    objective: str = "ddpm"  # loss.OBJECTIVES: DDPM epsilon/v (from the scheduler config) or rectified flow
    flow_weighting: str = "none"  # timestep density / loss weighting of training_utils (rectified flow only)
    lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    lora_scale_kwarg: str = "cross_attention_kwargs"  # the pipeline argument that scales a LoRA
    caption_field: str = "text"  # metadata.jsonl field it trains on by default
    # the tokenizer whose window must hold the whole caption; T5 families' CLIP encoders see its first 77
    # tokens, as their pipelines give them
    caption_tokenizer: str = "tokenizer"
    interchange: str = "kohya"  # INTERCHANGE: the LoRA file format A1111/ComfyUI read for this family
    pipeline_extras: dict = field(default_factory=dict)  # constructor arguments that are not components
    # the licence entries of a model card's front matter: a fine-tune inherits its base model's licence
    hub_license: dict = field(default_factory=lambda: {"license": "creativeml-openrail-m"})

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(p.encoder for p in self.text_parts)

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        """What ``--train_text_encoder`` trains: every CLIP encoder. T5 stays frozen, as diffusers' SD3 and Flux
        scripts keep it: T5-XXL has 4.7 B parameters, more than either denoiser's optimiser state could share."""
        return tuple(p.encoder for p in self.text_parts if p.encoder_class.startswith("CLIPTextModel"))

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(p.tokenizer for p in self.text_parts)

    @property
    def components(self) -> tuple[str, ...]:
        """Pipeline constructor components."""
        return ("vae", *self.text_encoders, *self.tokenizers, self.denoiser, "scheduler")

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


def rebuilt(module, **changes):
    """A new module of ``module``'s class from its config with ``changes`` (tiny builds of other families).

    Keys starting with ``_`` are dropped: ``_use_default_values`` would make ``from_config`` ignore the
    changed values of keys that were defaults."""
    config = {k: v for k, v in module.config.items() if not k.startswith("_")}
    return type(module).from_config({**config, **changes})


def ids_key(i: int) -> str:
    """Batch key of the i-th tokenizer's ids, in diffusers' spelling (input_ids, input_ids_2, ...)."""
    return "input_ids" if i == 0 else f"input_ids_{i + 1}"


def tokenize(tokenizers: list, texts: list[str]) -> dict:
    """Padded ids of ``texts`` under each tokenizer, keyed ``input_ids``, ``input_ids_2``, ..."""
    return {
        ids_key(i): t(
            texts, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for i, t in enumerate(tokenizers)
    }


def prompt_encoder(parts: dict) -> Callable[[list[str]], dict]:
    """captions -> the family's named embeddings from its frozen text encoders (the latent cache stores them)."""
    import torch

    family = parts["family"]
    encoders = [parts[n] for n in family.text_encoders]
    tokenizers = [parts[n] for n in family.tokenizers]

    def encode(texts: list[str]) -> dict:
        ids = [v.to(encoders[0].device) for v in tokenize(tokenizers, texts).values()]
        with torch.no_grad():
            return family.encode(encoders, ids)

    return encode


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell (8 for every released VAE, 4 for the tiny one), as diffusers pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@dataclass
class Denoiser:
    """The family's prediction for a batch: conditioning from cached embeddings or the text encoders, then
    the denoiser. The text encoders run with gradients only when one of them trains."""

    family: Family
    text_encoders: list
    scale: int  # VAE downscale factor

    @property
    def objective(self) -> str:
        return self.family.objective

    def __call__(self, model, batch: dict, noisy, timesteps):
        import torch

        if self.family.embed_names[0] in batch:
            embeds = {k: batch[k].to(noisy.device) for k in self.family.embed_names}
        else:
            trains = any(p.requires_grad for te in self.text_encoders for p in te.parameters())
            ids = [batch[ids_key(i)].to(noisy.device) for i in range(len(self.text_encoders))]
            with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
                embeds = self.family.encode(self.text_encoders, ids)
        embeds = {k: v.to(noisy.dtype) for k, v in embeds.items()}
        framing = {k: batch[k].to(noisy.device) for k in FRAMING if k in batch}
        return self.family.predict(model, noisy, timesteps, embeds | framing, self.scale)


def denoiser(family: Family, text_encoders: list, vae) -> Denoiser:
    return Denoiser(family, text_encoders, vae_scale_factor(vae))


def kohya_state_dict(lora_layers: dict, alpha: float) -> dict:
    """The A1111/ComfyUI (kohya) form of a diffusers UNet LoRA, by diffusers' own converters.

    ``convert_state_dict_to_kohya`` writes each module's alpha as its rank; the trained alpha is written
    instead, or a LoRA trained with alpha != rank would load at the wrong strength."""
    import torch
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(lora_layers))
    return {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
