"""Benchmark generate.py: images/s for several batch sizes and two samplers at equal step counts.

Every figure is an end-to-end ``generate()`` run (prompts, sampling, PNG writes, manifest rows) on one
loaded pipeline, after a warm-up, so the ratios show what batching and the sampler choice buy a user.
Without ``--model_path`` a random-weight model is built (``--size tiny`` for CPUs, ``--size sd1`` for
SD-1.x shapes on a GPU). Run from the repo root:

    .venv/bin/python benchmarks/bench_generate.py [--size tiny] [--resolution 64] [--steps 10] [--images 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import torch
import transformers

from lesiongen.devices import resolve_device
from lesiongen.diffusion.generate import SCHEDULERS, GenerateConfig, Processes, generate, load_model


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run(cfg: GenerateConfig, pipe) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of one fresh dataset run, its summary silenced.

    CPU seconds of this process are the steadier figure on a shared CPU machine, where other jobs
    stretch wall time; on a GPU, wall time is the one that counts.
    """
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = generate(cfg, pipe=pipe, processes=Processes())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result.generated / (time.perf_counter() - start), result.generated / (time.process_time() - cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default=None, help="a trained model (default: build a random-weight one)")
    p.add_argument("--size", default="tiny", choices=("tiny", "sd1"))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps for every measurement (equal across samplers)")
    p.add_argument("--images", type=int, default=16, help="images per measurement")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--schedulers", nargs=2, default=["ddim", "dpmsolver++"], choices=tuple(SCHEDULERS))
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best rate of each setting is kept")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        tmp = Path(tmp)
        model = args.model_path
        if model is None:
            from lesiongen.diffusion.tiny import build_tiny_pipeline

            model = str(build_tiny_pipeline(tmp / "model", resolution=args.resolution, seed=0, size=args.size))
        base = GenerateConfig(
            model_path=model,
            mode="dataset",
            condition="mel",
            num_images=args.images,
            guidance_scale=[7.5],
            num_inference_steps=[args.steps],
            resolution=args.resolution,
            device=args.device,
            contact_sheet=0,
        )
        device = resolve_device(base.device)
        pipe = load_model(base, device)

        def measure(name: str, **kw) -> tuple[float, float]:
            cfg = GenerateConfig(**{**base.__dict__, **kw, "output_dir": str(tmp / name)})
            return run(cfg, pipe)

        measure("warmup", num_images=max(args.batch_sizes), batch_size=max(args.batch_sizes))
        first, second = args.schedulers
        bs = max(args.batch_sizes)
        runs = {("batch", b): dict(batch_size=b, scheduler=first) for b in args.batch_sizes}
        runs[("sampler", second)] = dict(batch_size=bs, scheduler=second)
        # best of interleaved rounds, so load from other processes on a shared machine hits every setting alike
        best: dict = {}
        for r in range(args.repeats):
            for key, kw in runs.items():
                wall, cpu = measure(f"{key[0]}-{key[1]}-{r}", **kw)
                old = best.get(key, (0.0, 0.0))
                best[key] = (max(old[0], wall), max(old[1], cpu))
        by_batch = {b: best[("batch", b)] for b in args.batch_sizes}
        by_sampler = {first: by_batch[bs], second: best[("sampler", second)]}

    info = machine() | {
        "device": device,
        "dtype": str(pipe.unet.dtype),
        "model": args.model_path or f"random {args.size}",
    }
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print(
        f"{args.resolution} px, {args.steps} steps, guidance 7.5, {args.images} images per measurement, best of {args.repeats}"
    )
    ref = by_batch[args.batch_sizes[0]]
    print(f"\nbatch size ({first})   images/s   ratio | images/CPU-s   ratio")
    for size, (wall, cpu) in by_batch.items():
        print(f"{size:>18}   {wall:8.2f}   {wall / ref[0]:4.2f}x | {cpu:12.2f}   {cpu / ref[1]:4.2f}x")
    print(f"\nsampler (batch {bs})   images/s   ratio | images/CPU-s   ratio")
    for name, (wall, cpu) in by_sampler.items():
        print(
            f"{name:>18}   {wall:8.2f}   {wall / by_sampler[first][0]:4.2f}x | {cpu:12.2f}   {cpu / by_sampler[first][1]:4.2f}x"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": vars(args),
                    "images_per_s_and_per_cpu_s": {"by_batch": by_batch, "by_sampler": by_sampler},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
