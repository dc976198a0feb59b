"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, UNet cross-attention on its last hidden state.

SD 2.x differs for training only in its scheduler's ``prediction_type`` (v for the 768 px models), which
the shared loss reads from the scheduler config; its UNet projects attention inputs with linear layers
(``use_linear_projection``), which is how an SD 2.x folder is told from an SD 1.x one.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Family, TextPart, rebuilt

CLIP = (TextPart("tokenizer", "text_encoder", "CLIPTokenizer", "CLIPTextModel"),)
# StableDiffusionPipeline without the safety checker: LesionGen makes medical images, which it would blank.
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def encode(text_encoders: list, ids: list) -> dict:
    return {"prompt_embeds": text_encoders[0](ids[0])[0]}


def predict(unet, noisy, timesteps, embeds: dict, scale: int):
    return unet(noisy, timesteps, encoder_hidden_states=embeds["prompt_embeds"]).sample


def linear_projection(source: str) -> bool:
    from diffusers import UNet2DConditionModel

    return bool(UNet2DConditionModel.load_config(source, subfolder="unet").get("use_linear_projection"))


def is_sd(index: dict, source: str, v2: bool) -> bool:
    return index.get("_class_name") == "StableDiffusionPipeline" and linear_projection(source) == v2


def tiny_sd1(parts: dict, seed: int) -> dict:
    return parts


def tiny_sd2(parts: dict, seed: int) -> dict:
    """SD 2.1's differences on the tiny shapes: linear attention projections, a v-prediction DDIM scheduler."""
    import torch
    from diffusers import DDIMScheduler

    torch.manual_seed(seed)
    unet = rebuilt(parts["unet"], use_linear_projection=True)
    scheduler = DDIMScheduler.from_config(parts["scheduler"].config, prediction_type="v_prediction")
    return {**parts, "unet": unet, "scheduler": scheduler}


SD1 = Family(
    name="sd1",
    pipeline="StableDiffusionPipeline",
    image_pipeline="StableDiffusionImg2ImgPipeline",
    text_parts=CLIP,
    encode=encode,
    embed_names=("prompt_embeds",),
    predict=predict,
    native_resolution=512,
    matches=lambda index, source: is_sd(index, source, v2=False),
    tiny=tiny_sd1,
    pipeline_extras=NO_SAFETY_CHECKER,
)
SD2 = replace(
    SD1,
    name="sd2",
    native_resolution=768,  # stable-diffusion-2-1 (v); stable-diffusion-2-1-base is 512 px with epsilon
    matches=lambda index, source: is_sd(index, source, v2=True),
    tiny=tiny_sd2,
    hub_license={"license": "openrail++"},
)
