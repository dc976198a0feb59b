"""Classifier throughput: training images/s per model and size, and the data-loading ceiling.

Whichever is lower bounds an epoch: if decode+augment is slower than the model, add --num_workers;
if the model is slower, lower --image_size or use a GPU. Run from the repo root:

    .venv/bin/python benchmarks/bench_classify.py [--sizes 64 224] [--steps 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
from torch.utils.data import DataLoader

from lesiongen import labels
from lesiongen.classify.config import ClassifyConfig
from lesiongen.classify.data import ImageDataset, make_transform
from lesiongen.classify.models import autocast, build_model
from lesiongen.devices import adamw

REPO = Path(__file__).resolve().parents[1]


def train_rate(
    model_name: str, size: int, batch: int, steps: int, device: torch.device, amp: bool, vit_name: str
) -> float:
    """Images/s of forward+backward+AdamW on random tensors (model compute only, no data loading)."""
    cfg = ClassifyConfig(data_dir="-", model=model_name, vit_name=vit_name, image_size=size, pretrained=False)
    model = build_model(cfg).to(device).train()  # speed does not depend on the starting weights
    opt = adamw(model.parameters(), device, lr=1e-4)  # the optimiser classifier.py trains with
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, len(labels.CODES), (batch,), device=device)

    def step() -> None:
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocation, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def loading_rate(paths: list[str], size: int, workers: int, batch: int) -> float:
    """Images/s of JPEG decode + the 'standard' training augmentation through a DataLoader."""
    dataset = ImageDataset(paths, np.zeros(len(paths), dtype=np.int64), size, make_transform(size, "standard"))
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False)
    start = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--models", nargs="+", default=["resnet18", "vit"], help="--model values: any timm architecture")
    p.add_argument("--vit_name", default="vit_small_patch16_224")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model and size")
    p.add_argument("--images", type=int, default=256, help="images decoded for the loading ceiling")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data", default=os.environ.get("LESIONGEN_DATA", str(REPO.parent / "shared" / "data")))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
        f"gpu {gpu}; torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}; "
        f"threads {torch.get_num_threads()}, batch {args.batch_size}, amp {args.amp}"
    )
    print("\ntraining throughput (model only, random tensors):")
    for name in args.models:
        for size in args.sizes:
            rate = train_rate(name, size, args.batch_size, args.steps, device, args.amp, args.vit_name)
            label = f"{name} ({args.vit_name})" if name == "vit" else name
            print(f"  {label:32s} {size:4d} px  {rate:8.1f} img/s")

    images = sorted((Path(args.data) / "d7p" / "images").rglob("*.[jJ][pP][gG]"))[: args.images]
    if not images:
        print(f"\nno Derm7pt images under {args.data}/d7p/images: data-loading ceiling skipped (set LESIONGEN_DATA)")
        return
    print(f"\ndata-loading ceiling (decode + 'standard' augment, {len(images)} real Derm7pt JPEGs, short side 256 px):")
    for size in args.sizes:
        for workers in args.workers:
            rate = loading_rate([str(x) for x in images], size, workers, args.batch_size)
            print(f"  {size:4d} px  {workers} workers  {rate:8.1f} img/s")


if __name__ == "__main__":
    main()
