"""Diffusion: model loading, the training dataset and latent cache, the one training loop (LoRA or full + EMA),
checkpoints, validation, tiny offline builds, VAE training, generation plans and ``generate.py``."""
