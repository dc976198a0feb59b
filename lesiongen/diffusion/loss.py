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


def ddpm_noising(latents, noise, generators, noise_scheduler, weighting: str):
    """DDPM (SD 1.x, 2.x, SDXL): uniform timesteps, target epsilon or v as the scheduler config says."""
    timesteps = torch.cat(
        [
            torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g, device=latents.device)
            for g in generators
        ]
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, timesteps, noise_scheduler.get_velocity(latents, noise, timesteps), None
    return noisy, timesteps, noise, None


def flow_noising(latents, noise, generators, noise_scheduler, weighting: str):
    """Rectified flow (SD3, Flux): x_t = (1 - s) x + s n with target n - x; timesteps drawn from the density,
    and the loss weighted, as diffusers' ``training_utils`` define the scheme (Esser et al. 2024)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    u = torch.cat(
        [
            compute_density_for_timestep_sampling(
                weighting, 1, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, device=g.device, generator=g
            )
            for g in generators
        ]
    )
    indices = (u * noise_scheduler.config.num_train_timesteps).long().cpu()
    timesteps = noise_scheduler.timesteps[indices].to(latents.device)
    sigmas = noise_scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    return noisy, timesteps, noise - latents, compute_loss_weighting_for_sd3(weighting, sigmas)


OBJECTIVES = {"ddpm": ddpm_noising, "flow": flow_noising}


def batch_loss(batch: dict, unet, vae, denoiser, noise_scheduler, seed: int, snr_gamma=None, noise_offset=0.0):
    """One denoising loss: latents (cached distribution or VAE), noise, the family's objective, and its
    prediction (``families.denoiser``: conditioning from cached embeddings or the text encoders, then ``unet``)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_params" in batch:
        dist = DiagonalGaussianDistribution(batch["latent_params"].to(vae.device, vae.dtype))
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist
    generators = item_generators(seed, batch["item"].tolist(), dist.mean.device)
    shape = tuple(dist.mean.shape[1:])
    sample = dist.mean + dist.std * per_item_randn(generators, shape, dist.mean)
    # SD3 and Flux VAEs shift latents before scaling; SD's have no shift_factor
    latents = (sample - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
    noise = per_item_randn(generators, shape, latents)
    if noise_offset:
        # Offset noise (Lin et al. 2023): a per-channel constant lets the model shift overall brightness.
        noise = noise + noise_offset * per_item_randn(generators, (shape[0], 1, 1), latents)
    noisy, timesteps, target, weights = OBJECTIVES[denoiser.objective](
        latents, noise, generators, noise_scheduler, denoiser.family.flow_weighting
    )
    pred = denoiser(unet, batch, noisy, timesteps)
    if weights is None:
        return diffusion_loss(pred, target, timesteps, noise_scheduler, snr_gamma)
    per_item = (weights.float() * (pred.float() - target.float()) ** 2).mean(dim=list(range(1, pred.ndim)))
    return per_item.mean()
