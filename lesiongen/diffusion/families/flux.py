"""Flux.1: CLIP's pooled output plus T5's sequence, packed 2x2 latent patches with position ids, and the
distilled guidance input of Flux.1-dev; rectified-flow training as diffusers' Flux LoRA script does it
(uniform timesteps, no loss weighting). It trains on the long report (``long_text``) by default."""

from __future__ import annotations

from .base import Family, TextPart, rebuilt
from .t5 import tiny_t5_encoder, tiny_t5_tokenizer

T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length (Flux.1-dev)
TEXT = (
    TextPart("tokenizer", "text_encoder", "CLIPTokenizer", "CLIPTextModel"),
    TextPart("tokenizer_2", "text_encoder_2", "T5TokenizerFast", "T5EncoderModel", max_length=T5_MAX_LENGTH),
)
LORA_TARGETS = (  # diffusers' train_dreambooth_lora_flux.py defaults: attention and feed-forward of both streams
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
TRAIN_GUIDANCE = 3.5  # the guidance input while training Flux.1-dev (diffusers' script default, the pipeline's too)


def encode(text_encoders: list, ids: list) -> dict:
    """FluxPipeline's encoding: CLIP's pooled output, T5's last hidden state."""
    return {
        "prompt_embeds": text_encoders[1](ids[1])[0],
        "pooled_prompt_embeds": text_encoders[0](ids[0], output_hidden_states=False).pooler_output,
    }


def predict(transformer, noisy, timesteps, embeds: dict, scale: int):
    """Pack 2x2 latent patches into tokens, run the transformer (timesteps in [0, 1]), unpack the prediction."""
    import torch
    from diffusers import FluxPipeline

    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    text = embeds["prompt_embeds"]
    text_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = (
        torch.full((b,), TRAIN_GUIDANCE, device=noisy.device, dtype=noisy.dtype)
        if transformer.config.guidance_embeds
        else None
    )
    out = transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=embeds["pooled_prompt_embeds"],
        encoder_hidden_states=text,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)


def tiny(parts: dict, seed: int) -> dict:
    """Flux.1-dev's structure on tiny shapes: CLIP, a small T5, a 16-channel VAE, double and single blocks."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    text = parts["text_encoder"].config
    tokenizer_2 = tiny_t5_tokenizer(T5_MAX_LENGTH, seed)
    t5 = tiny_t5_encoder(len(tokenizer_2), 2 * text.hidden_size, seed)
    # 16 latent channels without quant convs, as SD3's and Flux's VAEs; a random VAE's latents are centred
    # (mean ~0, std ~1, like tiny.py's scaling_factor 1.0), so no shift: 0.0, which these pipelines require set
    vae = rebuilt(parts["vae"], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5.config.d_model,
        pooled_projection_dim=text.hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    # Flux.1-dev's scheduler config
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "vae": vae,
        "text_encoder": parts["text_encoder"],
        "text_encoder_2": t5,
        "tokenizer": parts["tokenizer"],
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "scheduler": scheduler,
    }


FLUX = Family(
    name="flux",
    pipeline="FluxPipeline",
    image_pipeline="FluxImg2ImgPipeline",
    text_parts=TEXT,
    encode=encode,
    embed_names=("prompt_embeds", "pooled_prompt_embeds"),
    predict=predict,
    native_resolution=1024,
    matches=lambda index, source: index.get("_class_name") == "FluxPipeline",
    tiny=tiny,
    denoiser="transformer",
    denoiser_class="FluxTransformer2DModel",
    objective="flow",
    flow_weighting="none",
    lora_targets=LORA_TARGETS,
    lora_scale_kwarg="joint_attention_kwargs",
    caption_field="long_text",
    caption_tokenizer="tokenizer_2",
    interchange="comfyui",
    hub_license={  # as diffusers' train_dreambooth_lora_flux.py writes it
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    },
)
