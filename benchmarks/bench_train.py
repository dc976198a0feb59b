"""Training speed with cached latents against encoding every step with the VAE and text encoder.

Both runs use the same model, data and settings and go through ``lesiongen.diffusion.train.train``; only
``--cache_latents`` differs. Steps/s excludes the first step (warm-up), checkpoints and validation;
the one-off cache build is reported separately.

    python benchmarks/bench_train.py                                   # tiny model, 64 px, CPU
    python benchmarks/bench_train.py --size sd1 --resolution 256 --mixed_precision fp16 --steps 30   # GPU
    python benchmarks/bench_train.py --data CAPTIONS/train             # real images (metadata.jsonl folder)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def synthetic_images(folder: Path, n: int, seed: int = 0) -> Path:
    """Dermoscopy-sized JPEGs (600x450) with a dark blob on skin tone, so decoding costs what real data costs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:450, 0:600]
    rows = []
    for i in range(n):
        cy, cx, r = rng.uniform(150, 300), rng.uniform(200, 400), rng.uniform(60, 140)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img = np.empty((450, 600, 3), np.float32)
        img[:] = rng.uniform([180, 120, 100], [230, 170, 150])
        img[blob] = rng.uniform([60, 30, 20], [140, 90, 70])
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:04d}.jpg", quality=90)
        rows.append({"file_name": f"img_{i:04d}.jpg", "text": f"melanoma, dermoscopic image, lesion {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def versions() -> str:
    import accelerate
    import diffusers
    import peft
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (
        f"{platform.platform()}, Python {platform.python_version()}, {device}, torch threads {torch.get_num_threads()}\n"
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, peft {peft.__version__}"
    )


def run(model: Path, data: Path, out: Path, cached: bool, args) -> dict:
    from lesiongen.diffusion.train import TrainConfig, train

    cfg = TrainConfig(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(data),
        output_dir=str(out),
        mode=args.mode,
        rank=args.rank,
        resolution=args.resolution,
        train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        gradient_checkpointing=args.gradient_checkpointing,
        max_train_steps=args.steps + 1,
        checkpointing_steps=10**9,
        validation_steps=0,
        mixed_precision=args.mixed_precision,
        learning_rate=1e-4,
        cache_latents=cached,
        report_to="none",
        dataloader_num_workers=args.workers,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(cfg)
    total = time.perf_counter() - start
    timed = result.step_seconds[1:]
    steps_per_s = len(timed) / sum(timed)
    row = {
        "cached": cached,
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * args.batch_size,
        "setup_s": total - sum(result.step_seconds),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="pipeline folder (default: build one with lesiongen.diffusion.tiny at --size)")
    p.add_argument("--size", default="tiny", choices=("tiny", "sd1"))
    p.add_argument("--data", help="folder with metadata.jsonl (default: synthetic 600x450 JPEGs)")
    p.add_argument("--images", type=int, default=32, help="synthetic images to make")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (plus one warm-up)")
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--workers", type=int, default=0, help="image decoding workers for the uncached run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            from lesiongen.diffusion.tiny import build_tiny_pipeline

            model = build_tiny_pipeline(tmp / "model", resolution=args.resolution, size=args.size)
        data = Path(args.data) if args.data else synthetic_images(tmp / "data", args.images)
        rows = [run(model, data, tmp / f"run-{c}", c, args) for c in (False, True)]

    print("\n" + versions())
    print(
        f"model {args.model or args.size}, {args.mode}, {args.resolution} px, batch {args.batch_size}, "
        f"precision {args.mixed_precision}, {args.steps} timed steps, data {args.data or f'{args.images} synthetic JPEGs'}"
    )
    for r in rows:
        mem = f", peak GPU memory {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else ""
        label = "cached latents " if r["cached"] else "VAE every step"
        print(
            f"  {label}: {r['steps_per_s']:.2f} steps/s, {r['images_per_s']:.1f} images/s, setup {r['setup_s']:.1f} s{mem}"
        )
    print(f"  speed-up from caching: {rows[1]['steps_per_s'] / rows[0]['steps_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
