"""Brief AutoencoderKL training, so a model built from random weights can reconstruct lesion colours.

A diffusion model can only draw what its autoencoder decodes: TOOLCHAIN.md measured that a briefly
trained tiny VAE turns blue and pink lesions brown, and every sample inherits that. So the loss is L1
on pixels plus a colour term (L1 on blurred opponent-colour channels, chroma weighted up) and a small
KL. Afterwards each latent channel's measured mean and std are folded into the VAE's 1x1 convs, so the UNet
sees zero-mean unit-variance latents whatever the VAE learned (``scaling_factor`` 1).

    python -m lesiongen.diffusion.train_vae --pretrained_model_name_or_path models/tiny-sd --train_data_dir data/images
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cli import option, run_stage
from ..devices import adamw
from ..errors import InputError
from ..files import atomic_dir
from ..images import IMAGE_SUFFIXES, list_images, read_rgb

# The VAE settings the demo and the Derm7pt experiment train with (docs/results.md says why).
SMALL_DATA_VAE = {"learning_rate": 2e-3, "lesion_weight": 4.0, "balance_classes": True, "whiten_strength": 0.5}
PROBE_IMAGES = 64  # images for the before/after colour error and the latent std (std within ~5% at 64)


def is_vae_dir(path: Path) -> bool:
    """A folder an AutoencoderKL was saved to (the only kind of folder train_vae replaces)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") == "AutoencoderKL"


@dataclass
class TrainVAEConfig:
    """Train a pipeline's AutoencoderKL briefly on a folder of images and save it into <pipeline>/vae."""

    pretrained_model_name_or_path: str = option(help="pipeline directory holding vae/", aliases=("--model",))
    train_data_dir: str = option(help="folder of training images (searched recursively)")
    output_dir: str | None = option(None, help="where to save the VAE (default: the pipeline's vae/, replaced)")
    resolution: int = option(64, help="training image size")
    max_train_steps: int = option(400, help="optimisation steps")
    train_batch_size: int = option(8, help="images per step")
    crop_size: int | None = option(
        None,
        help="train on random square crops of this size (the VAE is convolutional; 32 px crops cost a quarter of 64 px images)",
    )
    full_size_steps: int = option(
        0,
        help="train the last N steps on whole images instead of crops: GroupNorm and attention then see whole-image "
        "statistics (crop-only training shifted the colours of whole-image reconstructions)",
    )
    learning_rate: float = option(1e-3, help="AdamW learning rate (cosine decay to 10%)")
    lesion_weight: float = option(
        0.0,
        help="weight each pixel's L1 by 1 + W x its colour distance to the image's median (the skin), so the small "
        "lesion rather than the background gets the capacity; 0 is plain L1",
    )
    balance_classes: bool = option(
        False,
        help="draw each class equally often, labels from the folder's metadata.jsonl (build_captions' split "
        "folders have one), so rare red and pink lesions are learned as early as common brown ones",
    )
    whiten_strength: float = option(
        0.0,
        help="> 0: train on colour-whitened images in and out, then fold the 3x3 transforms into conv_in/conv_out "
        "(the saved VAE reads and writes RGB). Lesion images' red-vs-brown axis has about 1/12 of luminance's "
        "spread and is otherwise learned last; 1 whitens fully, 0.5 scales each axis by the 4th root",
    )
    kl_weight: float = option(1e-6, help="weight of the KL term; small, so reconstructions stay sharp")
    colour_weight: float = option(1.0, help="weight of the blurred opponent-colour L1 term")
    max_grad_norm: float | None = option(1.0, help="gradient clipping norm; none disables")
    max_train_samples: int | None = option(None, help="use at most this many images")
    seed: int = option(0, help="seed for weights' updates, batches and latent sampling")

    def __post_init__(self) -> None:
        vae_dir = Path(self.pretrained_model_name_or_path) / "vae"
        if not (vae_dir / "config.json").is_file():
            raise InputError(
                vae_dir,
                "no AutoencoderKL config.json here",
                "pass a pipeline directory, e.g. one built by `python -m lesiongen.diffusion.tiny`",
            )
        if not Path(self.train_data_dir).is_dir():
            raise InputError("--train_data_dir", f"folder {self.train_data_dir} not found", "pass a folder of images")
        out = Path(self.output_dir) if self.output_dir else None
        if out is not None and out.exists() and not is_vae_dir(out):
            raise InputError(
                f"--output_dir {out}",
                "exists and is not a VAE folder; saving here would replace it",
                "choose a new --output_dir, or omit it to replace the pipeline's vae/",
            )
        if self.crop_size is not None and not 8 <= self.crop_size <= self.resolution:
            raise InputError("--crop_size", f"{self.crop_size} is outside 8..{self.resolution}", "use e.g. 32, or none")
        if not 0 <= self.full_size_steps <= self.max_train_steps:
            raise InputError("--full_size_steps", f"{self.full_size_steps} is outside 0..--max_train_steps", "e.g. 150")
        if not 0 < self.learning_rate < float("inf"):  # false for nan too
            raise InputError("--learning_rate", f"must be a positive number, got {self.learning_rate}", "e.g. 1e-3")
        if self.lesion_weight < 0 or not 0 <= self.whiten_strength <= 1:
            raise InputError("--lesion_weight / --whiten_strength", "must be >= 0 / in [0, 1]", "e.g. 4 and 0.5")
        if self.balance_classes and not (Path(self.train_data_dir) / "metadata.jsonl").is_file():
            raise InputError(
                "--balance_classes",
                f"{self.train_data_dir} has no metadata.jsonl to read labels from",
                "pass a build_captions split folder (e.g. OUT/train), or drop the flag",
            )
        for flag in ("max_train_steps", "train_batch_size", "resolution"):
            if getattr(self, flag) <= 0:
                raise InputError(f"--{flag}", f"{getattr(self, flag)} is not positive", "use a positive number")


def training_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    paths = list_images(folder)[:limit] if limit else list_images(folder)
    if not paths:
        raise InputError(folder, "no images found", f"put {', '.join(IMAGE_SUFFIXES)} files in it")
    return paths


def load_images(paths: list[Path], resolution: int):
    """Images centre-cropped and resized as diffusion training frames them, as one float tensor in
    [-1, 1], NCHW (the demo's and Derm7pt's sets fit in memory)."""
    import numpy as np
    import torch

    arrays = [read_rgb(p, resolution).astype(np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def class_weights(folder: str | Path, paths: list[Path]) -> list[float]:
    """1 / (images of its class) per image, labels from ``folder/metadata.jsonl``'s file_name and label."""
    meta = Path(folder) / "metadata.jsonl"
    label_of = {}
    for line in meta.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "file_name" in row:
            label_of[(Path(folder) / row["file_name"]).resolve()] = row.get("label")
    labels = [label_of.get(p.resolve()) for p in paths]
    counts = Counter(labels)
    return [1.0 / counts[label] for label in labels]


def opponent(x):
    """RGB in [-1, 1] -> (luma, red-green, yellow-blue); chroma channels separate a blue lesion from a brown one."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    import torch

    return torch.stack([(r + g + b) / 3, r - g, (r + g) / 2 - b], 1)


def colour_whitening(x, strength: float):
    """3x3 matrix taking RGB to ZCA-whitened colour, where an axis with 1/k of the largest (luminance)
    variance is scaled by k^(strength/2): strength 1 whitens fully, 0 is the identity."""
    import torch

    eigvals, eigvecs = torch.linalg.eigh(torch.cov(x.transpose(0, 1).reshape(3, -1).double()))
    scale = (eigvals.max() / eigvals.clamp_min(1e-8)) ** (strength / 2)
    return (eigvecs @ torch.diag(scale) @ eigvecs.T).float()


def fold_colour_transform(vae, whitening) -> None:
    """Make a VAE trained on ``whitening @ rgb`` in and out read and write RGB, exactly: conv_in's inputs
    absorb the matrix and conv_out's outputs its inverse (no centring, so zero padding stays zero)."""
    import torch

    with torch.no_grad():
        conv_in, conv_out = vae.encoder.conv_in, vae.decoder.conv_out
        conv_in.weight.copy_(torch.einsum("ojhw,jc->ochw", conv_in.weight, whitening))
        inverse = torch.linalg.inv(whitening)
        conv_out.weight.copy_(torch.einsum("co,oihw->cihw", inverse, conv_out.weight))
        conv_out.bias.copy_(inverse @ conv_out.bias)


def vae_loss(recon, target, kl, kl_weight: float, colour_weight: float, lesion_weight: float = 0.0) -> tuple:
    """(total, parts) with parts = pixel L1 (lesion-weighted when asked), colour L1 (4x4-blurred
    opponent channels, chroma x2), KL."""
    import torch.nn.functional as F

    error = (recon - target).abs()
    if lesion_weight:
        skin = target.flatten(2).median(dim=2).values[..., None, None]
        w = 1 + lesion_weight * (target - skin).abs().mean(1, keepdim=True)
        pixel = (error * w).mean() / w.mean()
    else:
        pixel = error.mean()
    pool = max(1, target.shape[-1] // 16)
    diff = (F.avg_pool2d(opponent(recon), pool) - F.avg_pool2d(opponent(target), pool)).abs().mean((0, 2, 3))
    colour = diff[0] + 2 * (diff[1] + diff[2])
    total = pixel + colour_weight * colour + kl_weight * kl
    return total, {"l1": pixel.item(), "colour": colour.item(), "kl": kl.item()}


def mean_colour_error(vae, x, batch: int = 32) -> float:
    """Mean absolute error of each image's mean RGB after a round trip, in 0..255 units."""
    import torch

    errs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            rec = vae.decode(vae.encode(xb).latent_dist.mode()).sample.clamp(-1, 1)
            errs.append((rec.mean((2, 3)) - xb.mean((2, 3))).abs().mean(1) * 127.5)
    return float(torch.cat(errs).mean())


def standardise_latent_channels(vae, x, seed: int) -> tuple[list[float], list[float]]:
    """Fold each latent channel's mean and std into the 1x1 convs around the latent, so latents are N(0, 1).

    TOOLCHAIN.md measured per-channel stds from 0.7 to 4.4 in a briefly trained tiny VAE, which a single
    ``scaling_factor`` cannot balance, and the noise schedule assumes zero-mean latents. ``quant_conv`` gives
    the posterior (mean, log-variance) and ``post_quant_conv`` reads the latent, so dividing the one and
    multiplying the other is exact: decode(encode(x)) is unchanged and stock diffusers loads the result.
    Returns the (mean, std) per channel that were folded in.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i : i + 32]).latent_dist.sample(generator=gen) for i in range(0, len(x), 32)])
        flat = z.transpose(0, 1).reshape(z.shape[1], -1)
        mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
        c = vae.config.latent_channels
        q, post = vae.quant_conv, vae.post_quant_conv
        post.bias += post.weight[:, :, 0, 0] @ mean
        post.weight *= std[None, :, None, None]
        q.weight[:c] /= std[:, None, None, None]
        q.bias[:c] = (q.bias[:c] - mean) / std
        q.bias[c:] -= 2 * torch.log(std)
    return [float(m) for m in mean], [float(s) for s in std]


def shrink_random_posterior(vae, x) -> bool:
    """Start a random-weight encoder at posterior std ~0.05 instead of ~1.

    A random encoder's log-variance is ~0, so sampled latents are mostly noise and a brief training
    only learns to decode blurry brown averages; a small start std lets it learn an autoencoder first
    (the KL term still shapes the posterior). A trained VAE (std already small) is left alone.
    """
    import torch

    with torch.no_grad():
        std = float(vae.encode(x[:8]).latent_dist.std.mean())
        if std < 0.5:
            return False
        vae.quant_conv.bias[vae.config.latent_channels :] -= 6.0
    return True


def augment(x, gen, crop: int | None = None):
    """Random crop, flips and quarter turns: dermoscopy has no canonical orientation."""
    import torch

    if crop and crop < x.shape[-1]:
        top, left = (int(v) for v in torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen))
        x = x[..., top : top + crop, left : left + crop]
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    k = int(torch.randint(0, 4, (1,), generator=gen).item())
    return torch.rot90(x, k, (2, 3)) if k else x


def train_vae(cfg: TrainVAEConfig) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    source = Path(cfg.pretrained_model_name_or_path) / "vae"
    out = Path(cfg.output_dir) if cfg.output_dir else source
    vae = AutoencoderKL.from_pretrained(source)
    paths = training_images(cfg.train_data_dir, cfg.max_train_samples)
    x = load_images(paths, cfg.resolution)
    weights = torch.tensor(class_weights(cfg.train_data_dir, paths)) if cfg.balance_classes else None
    whitening = colour_whitening(x, cfg.whiten_strength) if cfg.whiten_strength else None
    # Colour error and latent std are measured on a fixed sample: a full pass costs as much as many steps.
    probe = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:PROBE_IMAGES]]
    vae.eval()
    colour_before = mean_colour_error(vae, probe)
    shrunk = shrink_random_posterior(vae, probe)

    vae.train()
    opt = adamw(vae.parameters(), "cpu", lr=cfg.learning_rate, weight_decay=0.0)
    warmup = max(1, cfg.max_train_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.max_train_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    log: list[dict] = []
    for step in tqdm(range(cfg.max_train_steps), desc="train vae", disable=None):
        if weights is None:
            idx = torch.randint(0, len(x), (min(cfg.train_batch_size, len(x)),), generator=gen)
        else:
            idx = torch.multinomial(weights, cfg.train_batch_size, replacement=True, generator=gen)
        whole = step >= cfg.max_train_steps - cfg.full_size_steps
        xb = augment(x[idx], gen, None if whole else cfg.crop_size)
        if whitening is not None:
            xb = torch.einsum("ij,bjhw->bihw", whitening, xb)
        posterior = vae.encode(xb).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss, parts = vae_loss(recon, xb, posterior.kl().mean(), cfg.kl_weight, cfg.colour_weight, cfg.lesion_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == cfg.max_train_steps - 1:
            log.append({"step": step + 1, "loss": loss.item(), **parts, "lr": sched.get_last_lr()[0]})

    vae.eval()
    if whitening is not None:
        fold_colour_transform(vae, whitening)
    colour_after = mean_colour_error(vae, probe)
    channel_mean, channel_std = standardise_latent_channels(vae, probe, cfg.seed)
    vae.register_to_config(scaling_factor=1.0)  # the channels are standardised inside the VAE now
    colour_standardised = mean_colour_error(vae, probe)
    summary = {
        "config": asdict(cfg),
        "images": len(x),
        "posterior_shrunk": shrunk,
        "first_loss": log[0]["loss"],
        "final_loss": log[-1]["loss"],
        "colour_error_before": colour_before,
        "colour_error_after": colour_after,
        "folded_channel_mean": channel_mean,
        "folded_channel_std": channel_std,
        "colour_error_after_standardising": colour_standardised,
        "scaling_factor": 1.0,
        "seconds": time.time() - start,
        "log": log,
    }
    with atomic_dir(out) as tmp:
        vae.save_pretrained(tmp)
        (tmp / "train_vae.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"VAE trained {cfg.max_train_steps} steps on {len(x)} images in {summary['seconds']:.0f} s: loss "
        f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, mean-colour error {colour_before:.1f} -> "
        f"{colour_after:.1f} (0-255), latent channel stds {', '.join(f'{v:.2f}' for v in channel_std)} standardised "
        f"to 1; saved to {out}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    def output(cfg: TrainVAEConfig) -> Path:
        return Path(cfg.output_dir or Path(cfg.pretrained_model_name_or_path) / "vae")

    prog = "python -m lesiongen.diffusion.train_vae"
    return run_stage(train_vae, TrainVAEConfig, argv, prog, "VAE training", ("train_data_dir",), output=output)


if __name__ == "__main__":
    sys.exit(main())
