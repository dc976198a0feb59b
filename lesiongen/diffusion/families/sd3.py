"""Stable Diffusion 3 / 3.5 (MMDiT): two CLIP encoders and T5, rectified-flow training.

Conditioning as ``StableDiffusion3Pipeline.encode_prompt`` builds it: both CLIPs' penultimate hidden states
concatenated, zero-padded to T5's width and joined with T5's sequence; the pooled projection of both CLIPs.
Trained with diffusers' logit-normal timestep density (the SD3 paper's choice, the default of diffusers'
SD3 LoRA script) on the flow target noise - x. It trains on the long report (``long_text``) by default.
"""

from __future__ import annotations

from .base import Family, TextPart, rebuilt
from .t5 import tiny_t5_encoder, tiny_t5_tokenizer

T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length, so training sees what sampling sees
TEXT = (
    TextPart("tokenizer", "text_encoder", "CLIPTokenizer", "CLIPTextModelWithProjection"),
    TextPart("tokenizer_2", "text_encoder_2", "CLIPTokenizer", "CLIPTextModelWithProjection"),
    TextPart("tokenizer_3", "text_encoder_3", "T5TokenizerFast", "T5EncoderModel", max_length=T5_MAX_LENGTH),
)
LORA_TARGETS = (  # diffusers' train_dreambooth_lora_sd3.py defaults: every attention projection, both streams
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


def encode(text_encoders: list, ids: list) -> dict:
    import torch
    import torch.nn.functional as F

    clip_hidden, pooled = [], []
    for encoder, token_ids in zip(text_encoders[:2], ids[:2], strict=True):
        out = encoder(token_ids, output_hidden_states=True)
        pooled.append(out[0])
        clip_hidden.append(out.hidden_states[-2])
    t5 = text_encoders[2](ids[2])[0]
    clip = torch.cat(clip_hidden, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return {"prompt_embeds": torch.cat([clip, t5], dim=-2), "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}


def predict(transformer, noisy, timesteps, embeds: dict, scale: int):
    return transformer(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=embeds["prompt_embeds"],
        pooled_projections=embeds["pooled_prompt_embeds"],
    ).sample


def tiny(parts: dict, seed: int) -> dict:
    """SD3's structure on tiny shapes: two projected CLIPs, a small T5, a 16-channel VAE and an MMDiT."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    text = parts["text_encoder"].config
    torch.manual_seed(seed)
    encoders = [CLIPTextModelWithProjection(text) for _ in range(2)]
    tokenizer_3 = tiny_t5_tokenizer(T5_MAX_LENGTH, seed)
    t5 = tiny_t5_encoder(len(tokenizer_3), 2 * text.hidden_size, seed)
    # 16 latent channels without quant convs, as SD3's and Flux's VAEs; a random VAE's latents are centred
    # (mean ~0, std ~1, like tiny.py's scaling_factor 1.0), so no shift: 0.0, which these pipelines require set
    vae = rebuilt(parts["vae"], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0)
    heads, head_dim = 2, 16
    transformer = SD3Transformer2DModel(
        sample_size=parts["unet"].config.sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5.config.d_model,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * text.projection_dim,
    )
    tokenizer_2 = type(parts["tokenizer"]).from_pretrained(parts["tokenizer"].name_or_path, pad_token="!")
    return {
        "vae": vae,
        "text_encoder": encoders[0],
        "text_encoder_2": encoders[1],
        "text_encoder_3": t5,
        "tokenizer": parts["tokenizer"],
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's scheduler config
    }


SD3 = Family(
    name="sd3",
    pipeline="StableDiffusion3Pipeline",
    image_pipeline="StableDiffusion3Img2ImgPipeline",
    text_parts=TEXT,
    encode=encode,
    embed_names=("prompt_embeds", "pooled_prompt_embeds"),
    predict=predict,
    native_resolution=1024,
    matches=lambda index, source: index.get("_class_name") == "StableDiffusion3Pipeline",
    tiny=tiny,
    denoiser="transformer",
    denoiser_class="SD3Transformer2DModel",
    objective="flow",
    flow_weighting="logit_normal",
    lora_targets=LORA_TARGETS,
    lora_scale_kwarg="joint_attention_kwargs",
    caption_field="long_text",
    caption_tokenizer="tokenizer_3",
    interchange="comfyui",
    hub_license={  # as diffusers' train_dreambooth_lora_sd3.py writes it
        "license": "other",
        "license_name": "stabilityai-ai-community",
        "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md",
    },
)
