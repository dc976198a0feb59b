"""SDXL: two CLIP text encoders, concatenated penultimate hidden states, the second one's pooled projection,
and size/crop conditioning (``add_time_ids``), as ``StableDiffusionXLPipeline.encode_prompt`` builds them."""

from __future__ import annotations

from .base import Family, TextPart, rebuilt

TEXT = (
    TextPart("tokenizer", "text_encoder", "CLIPTokenizer", "CLIPTextModel"),
    TextPart("tokenizer_2", "text_encoder_2", "CLIPTokenizer", "CLIPTextModelWithProjection"),
)
ADD_TIME_EMBED_DIM = 8  # tiny build only; SDXL's own is 256


def encode(text_encoders: list, ids: list) -> dict:
    """The pipeline's encoding: each encoder's penultimate hidden state, concatenated; the last one's pooled output."""
    import torch

    hidden, pooled = [], None
    for encoder, token_ids in zip(text_encoders, ids, strict=True):
        out = encoder(token_ids, output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}


def predict(unet, latents, timesteps, conditioning: dict, scale: int):
    """The UNet with SDXL's size conditioning: (original height, width, crop top, left, target height, width).

    Training frames bring their file's size and crop corner (``FRAMING``), as diffusers' SDXL script records
    them, so the model learns what a crop and a small source look like; without them (a caller with no
    files) the pipeline's default applies: original = target = the frame, crop at (0, 0)."""
    import torch

    n = len(latents)
    target = torch.tensor([latents.shape[-2] * scale, latents.shape[-1] * scale], device=latents.device).expand(n, 2)
    original = conditioning.get("original_size", target)
    corner = conditioning.get("crop_top_left", torch.zeros_like(target))
    time_ids = torch.cat([original, corner, target], dim=1).to(latents.dtype)
    added = {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": time_ids}
    return unet(latents, timesteps, encoder_hidden_states=conditioning["prompt_embeds"], added_cond_kwargs=added).sample


def tiny(parts: dict, seed: int) -> dict:
    """SDXL's structure on the tiny shapes: a second CLIP encoder with a projection, a UNet with text-time embeddings."""
    import torch
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    text = parts["text_encoder"].config
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text)
    unet = rebuilt(
        parts["unet"],
        cross_attention_dim=text.hidden_size * 2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADD_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADD_TIME_EMBED_DIM + text.projection_dim,
    )
    tokenizer_2 = type(parts["tokenizer"]).from_pretrained(parts["tokenizer"].name_or_path, pad_token="!")
    scheduler = EulerDiscreteScheduler.from_config(parts["scheduler"].config)
    return {
        **parts,
        "unet": unet,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


SDXL = Family(
    name="sdxl",
    pipeline="StableDiffusionXLPipeline",
    image_pipeline="StableDiffusionXLImg2ImgPipeline",
    text_parts=TEXT,
    encode=encode,
    embed_names=("prompt_embeds", "pooled_prompt_embeds"),
    predict=predict,
    native_resolution=1024,
    matches=lambda index, source: index.get("_class_name") == "StableDiffusionXLPipeline",
    tiny=tiny,
    pipeline_extras={"add_watermarker": False},
    hub_license={"license": "openrail++"},
)
