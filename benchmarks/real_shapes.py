"""``bench_train.py --size real``: one LoRA step of each family's denoiser at the released model's shapes.

Random weights at the real shapes (the config.json of each hub model named below), bf16, gradient
checkpointing, batch 1 at the native resolution, LoRA rank ``--rank`` on the family's targets, through
LesionGen's own ``batch_loss`` on random cached latents and text embeddings: what a step costs once the
latent cache is built and the text encoders and VAE have left the GPU. The cache build holds the text
encoders and the VAE instead; their bf16 weights are counted from their configs (meta tensors, no memory).
"""

from __future__ import annotations

import json
import time

SD1_UNET = dict(  # stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
OPENCLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
)
VAE4 = dict(latent_channels=4)  # SD 1.x/2.x/SDXL VAE: the AutoencoderKL of the tiny build at full width
VAE16 = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0)

# family -> (denoiser config, text embeddings per image {name: shape}, VAE, text encoders [(class, config)], px)
REAL = {
    "sd1": (dict(SD1_UNET, sample_size=64), {"prompt_embeds": (77, 768)}, VAE4, [("CLIPTextModel", CLIP_L)], 512),
    "sd2": (  # stabilityai/stable-diffusion-2-1
        dict(
            SD1_UNET,
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        ),
        {"prompt_embeds": (77, 1024)},
        VAE4,
        [("CLIPTextModel", OPENCLIP_H)],
        768,
    ),
    "sdxl": (  # stabilityai/stable-diffusion-xl-base-1.0
        dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        {"prompt_embeds": (77, 2048), "pooled_prompt_embeds": (1280,)},
        VAE4,
        [("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", OPENCLIP_G)],
        1024,
    ),
    "sd3": (  # stabilityai/stable-diffusion-3-medium-diffusers
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
        ),
        {"prompt_embeds": (77 + 256, 4096), "pooled_prompt_embeds": (2048,)},
        VAE16,
        [
            ("CLIPTextModelWithProjection", CLIP_L),
            ("CLIPTextModelWithProjection", OPENCLIP_G),
            ("T5EncoderModel", T5_XXL),
        ],
        1024,
    ),
    "flux": (  # black-forest-labs/FLUX.1-dev
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        {"prompt_embeds": (512, 4096), "pooled_prompt_embeds": (768,)},
        VAE16,
        [("CLIPTextModel", CLIP_L), ("T5EncoderModel", T5_XXL)],
        1024,
    ),
}
VAE_SHAPE = dict(  # the released VAEs' encoder/decoder widths
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
)


def cache_phase_gib(name: str) -> float:
    """bf16 weights of the text encoders and the VAE, which the cache build holds, counted on the meta device."""
    import torch
    import transformers
    from diffusers import AutoencoderKL

    _, _, vae, encoders, _ = REAL[name]
    with torch.device("meta"):
        modules = [AutoencoderKL(**VAE_SHAPE, **vae)]
        for cls, config in encoders:
            config_cls = transformers.T5Config if cls == "T5EncoderModel" else transformers.CLIPTextConfig
            modules.append(getattr(transformers, cls)(config_cls(**config)))
    return sum(p.numel() for m in modules for p in m.parameters()) * 2 / 2**30


def real_step(name: str, rank: int, steps: int, warmup: int, device: str = "cuda") -> dict:
    """Steps/s and peak CUDA memory of LoRA training steps on the family's denoiser at native shapes."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL

    from lesiongen.devices import adamw
    from lesiongen.diffusion.families import FAMILIES, NOISE_SCHEDULERS, denoiser
    from lesiongen.diffusion.loss import batch_loss
    from lesiongen.diffusion.pipeline import add_lora

    family = FAMILIES[name]
    config, embeds, vae_config, _, px = REAL[name]
    device, dtype = torch.device(device), torch.bfloat16
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with device:
        model = getattr(diffusers, family.denoiser_class)(**config).to(dtype)
        vae = AutoencoderKL(**VAE_SHAPE, **vae_config).to(dtype)  # only its config and dtype are read
    model.requires_grad_(False)
    add_lora(model, rank, family=family)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    model.enable_gradient_checkpointing()
    model.train()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # after the float32 build and the cast: the peak of training alone
    side = px // 8
    batch = {
        "latent_params": torch.randn(1, 2 * vae.config.latent_channels, side, side, device=device, dtype=dtype),
        **{k: torch.randn(1, *shape, device=device, dtype=dtype) for k, shape in embeds.items()},
        "item": torch.zeros(1, dtype=torch.long),
    }
    scheduler = getattr(diffusers, NOISE_SCHEDULERS[family.objective])()
    predict = denoiser(family, [], vae)
    optimizer = adamw(params, device, lr=1e-4)  # train.py's optimiser
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize() if cuda else None
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = batch_loss(batch, model, vae, predict, scheduler, seed=i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if cuda else None
    seconds = time.perf_counter() - start
    row = {
        "family": name,
        "resolution": px,
        "denoiser_params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "lora_params_m": sum(p.numel() for p in params) / 1e6,
        "steps_per_s": steps / seconds,
        "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "cache_phase_weights_gib": cache_phase_gib(name),
    }
    del model, vae, optimizer, batch
    return row


def run_real(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--size real needs a GPU (bf16 steps at native shapes); on a CPU use --size tiny")
    print(torch.cuda.get_device_name(0), torch.__version__)
    for name in args.families:
        print(json.dumps(real_step(name, args.rank, args.steps, args.warmup)), flush=True)
    return 0
