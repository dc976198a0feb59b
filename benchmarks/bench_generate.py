"""Benchmark generate.py against the original generation loop at matched steps and guidance.

The original LesionGen made a dataset with one pipeline call per image (its model's own sampler,
``num_inference_steps=30, guidance_scale=7.5``, a seeded generator), then ``image.save``. That loop is
written out below as the baseline and timed on the same prompts and seeds as end-to-end ``generate()``
runs (prompts, batched sampling with DPM-Solver++, PNG writes, manifest rows) at several batch sizes,
and optionally with ``--torch_compile``. Settings are timed in interleaved rounds, so load from other
processes on a shared machine hits every setting alike; the best round of each is kept. Without
``--model_path`` a random-weight model is built (``--size tiny`` for CPUs, ``--size sd1`` for SD-1.x
shapes on a GPU). Run from the repo root:

    .venv/bin/python benchmarks/bench_generate.py [--images 16] [--batch_sizes 4 16] [--torch_compile]
    .venv/bin/python benchmarks/bench_generate.py --size sd1 --resolution 512 --device cuda --images 64
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
from lesiongen.diffusion.generate import (
    GenerateConfig,
    Processes,
    build_prompt,
    generate,
    load_model,
    make_plan,
    resolve_dtype,
)
from lesiongen.diffusion.pipeline import load_pipeline

STEPS, GUIDANCE = 30, 7.5  # the original loop's settings, matched by every measurement


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


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``work()``, GPU work included.

    CPU seconds are the steadier figure on a shared CPU machine, where other jobs stretch wall time;
    on a GPU, wall time is the one that counts.
    """
    start, cpu = time.perf_counter(), time.process_time()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def original_loop(pipe, prompts: list[str], seeds: list[int], out_dir: Path) -> None:
    """The baseline: one pipeline call per image at the original settings, then a plain PNG save."""
    out_dir.mkdir(parents=True)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        generator = torch.Generator(pipe.device).manual_seed(seed)
        image = pipe(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator).images[0]
        image.save(out_dir / f"{i:06d}.png")


def main(argv: list[str] | None = None) -> dict:
    """Time every setting, print the table and return the figures (also written to ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default=None, help="a trained model (default: build a random-weight one)")
    p.add_argument("--size", default="tiny", choices=("tiny", "sd1"))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=16, help="images per measurement")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 16], help="generate() batch sizes to time")
    p.add_argument("--torch_compile", action="store_true", help="also time generate() with --torch_compile")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best rate of each setting is kept")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
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
            guidance_scale=[GUIDANCE],
            num_inference_steps=[STEPS],
            resolution=args.resolution,
            device=args.device,
            contact_sheet=0,
        )
        device = resolve_device(base.device)
        plan = make_plan(base)
        prompts = [build_prompt(s.record(), base.caption_style, base.seed) for s in plan]
        seeds = [s.seed for s in plan]
        original = load_pipeline(model, device=device, dtype=resolve_dtype(base, device))  # its own sampler
        pipe = load_model(base, device)
        settings = {
            f"generate() batch {b}": (pipe, dict(batch_size=b, torch_compile="false")) for b in args.batch_sizes
        }
        if args.torch_compile:
            b = max(args.batch_sizes)
            settings[f"generate() batch {b}, --torch_compile"] = (
                load_model(base, device),
                dict(batch_size=b, torch_compile="true"),
            )

        def run_generate(name: str, pipe, **kw) -> None:
            cfg = GenerateConfig(**{**base.__dict__, **kw, "output_dir": str(tmp / name)})
            with contextlib.redirect_stdout(io.StringIO()):
                generate(cfg, pipe=pipe, processes=Processes())

        # warm-ups, one batch each (a compiled UNet compiles here; its extra time over eager is reported)
        timed(lambda: original_loop(original, prompts[:1], seeds[:1], tmp / "warm-original"))
        first_batch = {}
        for i, (name, (pipe_, kw)) in enumerate(settings.items()):
            kw = {**kw, "num_images": kw["batch_size"]}
            first_batch[name] = timed(lambda pipe_=pipe_, kw=kw, i=i: run_generate(f"warm-{i}", pipe_, **kw))[0]

        best: dict[str, tuple[float, float]] = {}

        def keep(name: str, seconds: tuple[float, float]) -> None:
            old = best.get(name, (0.0, 0.0))
            best[name] = (max(old[0], args.images / seconds[0]), max(old[1], args.images / seconds[1]))

        baseline = f"original loop ({type(original.scheduler).__name__}, 1 image per call)"
        for r in range(args.repeats):
            keep(baseline, timed(lambda r=r: original_loop(original, prompts, seeds, tmp / f"original-{r}")))
            for i, (name, (pipe_, kw)) in enumerate(settings.items()):
                keep(name, timed(lambda pipe_=pipe_, kw=kw, i=i, r=r: run_generate(f"{i}-{r}", pipe_, **kw)))

    info = machine() | {
        "device": device,
        "dtype": str(pipe.unet.dtype),
        "model": args.model_path or f"random {args.size}",
    }
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print(
        f"{args.resolution} px, {STEPS} steps, guidance {GUIDANCE}, generate() with {base.scheduler}, "
        f"{args.images} images per measurement, best of {args.repeats} interleaved rounds"
    )
    ref = best[baseline]
    print(f"\n{'setting':<52} images/s   ratio | images/CPU-s   ratio")
    for name, (wall, cpu) in best.items():
        print(f"{name:<52} {wall:8.3f}   {wall / ref[0]:4.2f}x | {cpu:12.3f}   {cpu / ref[1]:4.2f}x")
    if args.torch_compile:
        name = next(n for n in settings if "compile" in n)
        eager = f"generate() batch {max(args.batch_sizes)}"
        extra = first_batch[name] - first_batch[eager]
        saved = 1 / best[eager][0] - 1 / best[name][0]  # wall seconds saved per image once compiled
        pays = f"pays back after about {extra / saved:.0f} images" if saved > 0 else "never pays back here"
        print(f"\n--torch_compile: the first batch took {extra:.0f} s longer than eager (compilation); {pays}")
    figures = {
        "machine": info,
        "args": vars(args),
        "baseline": baseline,
        "images_per_s_and_per_cpu_s": best,
        "first_batch_s": first_batch,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
