"""Latent-cache build speed and peak memory as the data grows, with one process and with two.

Each build is a fresh ``python -m lesiongen.diffusion.cache_latents`` run (two processes through
``accelerate launch`` on the CPU with gloo, as TOOLCHAIN.md describes) on generated 64 px PNGs; it
reports the build's images/s and each process's peak RSS. A second child then reads every cached item
once in a random order, as training does, and reports items/s and its peak RSS. A cache held in RAM
would grow with the data; a sharded, memory-mapped one should not.

    python benchmarks/bench_cache.py --sizes 10000 50000 --processes 1 2       # about 1 h on 2 busy cores
    python benchmarks/bench_cache.py --sizes 500 2000 --processes 1            # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import describe

REPO = Path(__file__).resolve().parents[1]
CAPTION = "{dx}, dermoscopic image, {shape} lesion {i}"


def make_images(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` 64 px PNGs of a dark blob on skin tone, with a metadata.jsonl; reused when already there."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    have = len(list(images.glob("*.png")))
    rng = np.random.default_rng(seed + have)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(have, n):
        cy, cx, r = rng.uniform(20, 44), rng.uniform(20, 44), rng.uniform(8, 20)
        img = np.empty((64, 64, 3), np.float32)
        img[:] = rng.uniform([180, 120, 100], [230, 170, 150])
        img[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] = rng.uniform([60, 30, 20], [140, 90, 70])
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images / f"{i:06d}.png")
    return folder


def subset(folder: Path, n: int) -> Path:
    """A training folder whose metadata.jsonl lists the first ``n`` images."""
    out = folder / f"first-{n}"
    out.mkdir(exist_ok=True)
    if not (out / "images").exists():
        os.symlink(Path("..") / "images", out / "images")  # relative: out is inside folder
    rows = [
        {"file_name": f"images/{i:06d}.png", "text": CAPTION.format(dx=("mel", "nv", "bcc")[i % 3], shape="round", i=i)}
        for i in range(n)
    ]
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(model: Path, data: Path, cache: Path, processes: int, cores: str | None) -> dict:
    """One fresh build in child process(es); the command's own report line, parsed."""
    shutil.rmtree(cache, ignore_errors=True)
    flags = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64"]
    flags += ["--output_dir", str(cache.parent / "unused-output"), "--cache_dir", str(cache), "--mixed_precision", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if processes == 1:
        cmd = [sys.executable, "-m", "lesiongen.diffusion.cache_latents", *flags]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
        cmd += ["-m", "lesiongen.diffusion.cache_latents", *flags]
    if cores:
        cmd = ["taskset", "-c", cores, *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"build failed:\n{proc.stderr[-3000:]}")
    m = re.search(
        r"(\d+) images in (\d+) shards, (\d+) written by (\d+) process\(es\) in ([\d.]+) s, peak RSS (\d+)", proc.stdout
    )
    images, shards, written, procs, seconds, rss = m.groups()
    assert int(written) == int(shards) and int(procs) == processes, proc.stdout
    disk = sum(p.stat().st_size for p in cache.glob("shard-*"))
    return {"images": int(images), "seconds": float(seconds), "rss_mib": int(rss), "disk_mib": disk / 2**20}


def read_pass(cache: Path, data: Path, model: Path, cores: str | None) -> dict:
    """Every item once in random order through ``CachedLatentDataset`` in a fresh child; items/s and peak RSS."""
    cmd = [sys.executable, __file__, "--read_pass", str(cache), "--data", str(data), "--model", str(model)]
    cmd = ["taskset", "-c", cores, *cmd] if cores else cmd
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"read pass failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_read_pass(cache: Path, data: Path, model: Path) -> None:
    import torch
    from transformers import CLIPTokenizer

    from lesiongen.diffusion.dataset import read_examples
    from lesiongen.diffusion.latent_cache import SHARD_RE, CachedLatentDataset, CacheLayout

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", model_max_length=77)
    examples = read_examples(data)
    first = next(p for p in sorted(cache.iterdir()) if SHARD_RE.match(p.name))
    from safetensors import safe_open

    with safe_open(str(first), framework="pt") as f:
        key, shard_size = f.metadata()["key"], f.get_slice("latent_params").get_shape()[0]
    layout = CacheLayout(cache, key, len(examples), shard_size, with_text=True)
    dataset = CachedLatentDataset(layout, examples, [tokenizer])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for i in order:
        dataset[(i, i % 2 == 0, False, i)]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"items_per_s": len(order) / seconds, "rss_mib": peak, "rss_before_mib": baseline}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="pipeline folder (default: build the tiny one under --work)")
    p.add_argument("--work", default="/tmp/lesiongen-bench-cache", help="images, caches and the model go here")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cores", default=None, help="taskset core list for each run, e.g. 0,1 (default: any)")
    p.add_argument("--read_pass", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.read_pass:
        run_read_pass(Path(args.read_pass), Path(args.data), Path(args.model))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = Path(args.model)
    else:
        from lesiongen.diffusion.tiny import build_tiny_pipeline

        model = work / "tiny-sd"
        if not (model / "model_index.json").is_file():
            build_tiny_pipeline(model, resolution=64)
    images = make_images(work / "data", max(args.sizes))
    rows = []
    for n in args.sizes:
        data = subset(images, n)
        for processes in args.processes:
            cache = work / f"cache-{n}-{processes}"
            row = {"n": n, "processes": processes, **build(model, data, cache, processes, args.cores)}
            read = read_pass(cache, data, model, args.cores)
            row.update(read_items_per_s=read["items_per_s"], read_rss_mib=read["rss_mib"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(cache, ignore_errors=True)

    print("\n" + describe(("torch", "diffusers", "accelerate", "safetensors")))
    print("tiny model, 64 px PNGs, both flips and the caption of each image encoded, float32")
    print("images  procs  build images/s  build peak RSS/proc  cache on disk  read items/s  read peak RSS")
    for r in rows:
        print(
            f"{r['n']:>6}  {r['processes']:>5}  {r['images'] / r['seconds']:>14.1f}  {r['rss_mib']:>15.0f} MiB"
            f"  {r['disk_mib']:>9.0f} MiB  {r['read_items_per_s']:>12.0f}  {r['read_rss_mib']:>9.0f} MiB"
        )
    for n in args.sizes:
        by = {r["processes"]: r for r in rows if r["n"] == n}
        if 1 in by and 2 in by:
            print(f"{n} images: 2 processes build {by[1]['seconds'] / by[2]['seconds']:.2f}x as fast as 1")
    if len(args.sizes) > 1:
        small, large = (min(args.sizes), max(args.sizes))
        for procs in args.processes:
            a = next(r for r in rows if r["n"] == small and r["processes"] == procs)
            b = next(r for r in rows if r["n"] == large and r["processes"] == procs)
            print(
                f"{procs} process(es), {small} -> {large} images ({large / small:.0f}x the data): build peak RSS "
                f"{a['rss_mib']:.0f} -> {b['rss_mib']:.0f} MiB, read peak RSS {a['read_rss_mib']:.0f} -> "
                f"{b['read_rss_mib']:.0f} MiB, cache on disk {a['disk_mib']:.0f} -> {b['disk_mib']:.0f} MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
