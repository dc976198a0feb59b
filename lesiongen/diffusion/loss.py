"""The denoising loss of one micro-batch, on tensors (tests call it directly).

Every random number an item needs (its latent sample, its noise, its timestep) comes from a generator
seeded by (seed, item number). So a batch of 4 and four batches of 1 give the same loss terms, which
is what lets the micro-batch size change without changing the result, and resume draw the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(model_pred, target, timesteps, noise_scheduler, snr_gamma: float | None = None):
    """MSE, optionally min-SNR weighted (Hang et al. 2023): hard, noisy timesteps stop dominating the gradient."""
    from diffusers.training_utils import compute_snr

    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float())
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr
    per_item = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(
        dim=list(range(1, model_pred.ndim))
    )
    return (per_item * weights).mean()


def item_generators(seed: int, items: list[int], device) -> list[torch.Generator]:
    """One generator per stream item, so its random numbers do not depend on the batch it lands in."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + item * 7_919 + 1) for item in items]


def per_item_randn(generators: list[torch.Generator], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, device=like.device, dtype=like.dtype) for g in generators])


def batch_loss(batch: dict, unet, vae, text_encoder, noise_scheduler, seed: int, snr_gamma=None, noise_offset=0.0):
    """One denoising loss: latents (cached distribution or VAE), captions (cached or encoded), noise, UNet."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_params" in batch:
        dist = DiagonalGaussianDistribution(batch["latent_params"].to(vae.device, vae.dtype))
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
    generators = item_generators(seed, batch["item"].tolist(), dist.mean.device)
    shape = tuple(dist.mean.shape[1:])
    latents = (dist.mean + dist.std * per_item_randn(generators, shape, dist.mean)) * vae.config.scaling_factor
    if "prompt_embeds" in batch:
        text = batch["prompt_embeds"].to(latents.device)
    else:
        text_trains = any(p.requires_grad for p in text_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and text_trains):
            text = text_encoder(batch["input_ids"].to(latents.device))[0]
    noise = per_item_randn(generators, shape, latents)
    if noise_offset:
        # Offset noise (Lin et al. 2023): a per-channel constant lets the model shift overall brightness.
        noise = noise + noise_offset * per_item_randn(generators, (shape[0], 1, 1), latents)
    timesteps = torch.cat(
        [
            torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g, device=latents.device)
            for g in generators
        ]
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy, timesteps, encoder_hidden_states=text.to(noisy.dtype)).sample
    return diffusion_loss(pred, target, timesteps, noise_scheduler, snr_gamma)
