"""The GPU check: SD-1.x-size LoRA training and generation speed, peak memory and achieved TFLOP/s, in one run.

``benchmarks/gpu_check.sh`` installs the carried wheels and calls this; run alone it needs LesionGen's
requirements. It builds a Stable-Diffusion-1.x-shaped pipeline with random weights (``--size sd1``;
speed does not depend on the weights), then:

- LoRA training through ``lesiongen.diffusion.train`` with the original settings (rank 64, gradient
  checkpointing, 4 images per optimiser step) in ``--mixed_precision``: cached and uncached latents,
  each as batch 1 x accumulation 4 and with ``--micro_batch_size auto``;
- generation with the diffusers pipeline (DPM-Solver++, 25 steps, guidance 7.5) at batch 1 and 16;
- the two ratios the speed goals are set in, on this model and device: LoRA training against diffusers'
  ``train_text_to_image_lora.py`` at identical flags (``bench_train.py``; with ``--reference PATH``, since
  that script is not part of LesionGen) and ``generate()`` against the original one-image-per-call loop at
  30 steps and guidance 7.5 (``bench_generate.py``). ``--torch_compile`` adds a compiled run to each.

Each prints steps/s or images/s, peak memory and the UNet's achieved TFLOP/s: FLOPs counted by
``torch.utils.flop_counter`` on one real pass (training: forward, backward and the checkpointing
recompute, i.e. the FLOPs the GPU executes) times the measured rate, against the GPU's dense bf16
peak from NVIDIA's datasheets (``--peak_tflops`` for a GPU not in the table).

    python benchmarks/gpu_check.py                                     # sd1, 512 px, bf16, on the GPU
    python benchmarks/gpu_check.py --reference train_text_to_image_lora.py --torch_compile   # and both ratios
    python benchmarks/gpu_check.py --size tiny --device cpu           # the CPU dry run the tests execute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, like the shell wrapper does

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's product datasheets; matched by substring.
BF16_PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft")
PARTS = ("check", "training-ratio", "generation-ratio")
PROMPT = "melanoma, dermoscopic image, showing irregular dots and globules, on the back of a male"


def report(name: str, images_per_s: float, flops_per_image: float, memory, peak: float | None, **rates) -> dict:
    """One result row, printed as JSON as soon as it is measured: the rate, memory and achieved TFLOP/s."""
    tflops = flops_per_image * images_per_s / 1e12
    row = {
        "run": name,
        **rates,
        "images_per_s": images_per_s,
        "memory_gib": memory.gib,
        "memory_label": memory.label,
        "tflops": tflops,
        "utilisation": tflops / peak if peak else None,
    }
    print(json.dumps(row), flush=True)
    return row


def peak_tflops(device, override: float | None) -> float | None:
    import torch

    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def synthetic_images(folder: Path, n: int, seed: int = 0) -> Path:
    """Dermoscopy-sized JPEGs (600x450) with a dark blob on skin tone, so decoding costs what real data costs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:450, 0:600]
    rows = []
    for i in range(n):
        cy, cx, r = rng.uniform(150, 300), rng.uniform(200, 400), rng.uniform(60, 140)
        img = np.empty((450, 600, 3), np.float32)
        img[:] = rng.uniform([180, 120, 100], [230, 170, 150])
        img[((yy - cy) ** 2 + (xx - cx) ** 2) < r**2] = rng.uniform([60, 30, 20], [140, 90, 70])
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:04d}.jpg", quality=90)
        rows.append({"file_name": f"img_{i:04d}.jpg", "text": f"{PROMPT}, lesion {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


class Memory:
    """Peak GPU memory allocated (CUDA) or the process's peak RSS (CPU) over a block, in GiB."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return False

    @property
    def label(self) -> str:
        return "peak GPU memory" if self.device.type == "cuda" else "peak RSS"


def unet_training_flops(model: Path, args, device, dtype) -> float:
    """FLOPs one image costs in a LoRA training step: UNet forward, backward and the checkpointing recompute."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lesiongen.diffusion.families import denoiser
    from lesiongen.diffusion.loss import batch_loss
    from lesiongen.diffusion.pipeline import add_lora, load_training_parts

    parts = load_training_parts(model)
    for name in ("unet", "vae", "text_encoder"):
        parts[name].requires_grad_(False).to(device, dtype)
    add_lora(parts["unet"], args.rank, seed=0)
    for p in parts["unet"].parameters():
        if p.requires_grad:
            p.data = p.data.float()
    parts["unet"].enable_gradient_checkpointing()
    parts["unet"].train()
    latent = args.resolution // (8 if args.size == "sd1" else 4)
    channels = parts["vae"].config.latent_channels
    text = parts["text_encoder"].config.hidden_size
    batch = {
        "latent_params": torch.randn(1, 2 * channels, latent, latent, device=device, dtype=dtype),
        "prompt_embeds": torch.randn(1, 77, text, device=device, dtype=dtype),
        "item": torch.zeros(1, dtype=torch.long),
    }
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with FlopCounterMode(display=False) as counter, autocast:
        predict = denoiser(parts["family"], [], parts["vae"])  # the batch holds the embeddings
        batch_loss(batch, parts["unet"], parts["vae"], predict, parts["noise_scheduler"], 0).backward()
    del parts
    return float(counter.get_total_flops())


def train_runs(model: Path, data: Path, work: Path, args, device, flops_per_image: float, peak) -> list[dict]:
    """Four training runs: cached and uncached latents, each as batch 1 x 4 and with the automatic micro-batch."""
    from lesiongen.diffusion.train import TrainConfig, train

    rows = []
    for cached in (True, False):
        for micro in (None, "auto"):
            cfg = TrainConfig(
                pretrained_model_name_or_path=str(model),
                train_data_dir=str(data),
                output_dir=str(work / f"train-{cached}-{micro}"),
                cache_dir=str(work / "latent-cache"),
                resolution=args.resolution,
                rank=args.rank,
                train_batch_size=1,
                gradient_accumulation_steps=4,
                micro_batch_size=micro,
                gradient_checkpointing=True,
                max_train_steps=args.warmup + args.steps,
                checkpointing_steps=10**9,
                validation_steps=0,
                learning_rate=1e-4,
                mixed_precision=args.mixed_precision,
                cache_latents=cached,
                torch_compile="false",  # the original settings' speed; the training ratio times compiled runs
                report_to="none",
                dataloader_num_workers=args.workers,
            )
            with Memory(device) as memory:
                result = train(cfg)
            timed = result.step_seconds[args.warmup :]
            steps_per_s = len(timed) / sum(timed)
            images_per_s = 4 * steps_per_s
            micro_used = json.loads((Path(cfg.output_dir) / "config.json").read_text())["micro_batch"]
            name = (
                f"LoRA {'cached' if cached else 'uncached'}, {'auto ' if micro else ''}{micro_used} x {4 // micro_used}"
            )
            rows.append(report(name, images_per_s, flops_per_image, memory, peak, steps_per_s=steps_per_s))
            gc.collect()
    return rows


def generation_runs(model: Path, args, device, dtype, peak) -> list[dict]:
    """Images/s of the pipeline at each batch size, after one warm-up call per size."""
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from torch.utils.flop_counter import FlopCounterMode

    from lesiongen.diffusion.pipeline import from_pretrained_pipeline

    pipe = from_pretrained_pipeline(model, dtype).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    latent = args.resolution // pipe.vae_scale_factor
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pipe.unet(
            torch.randn(2, 4, latent, latent, device=device, dtype=dtype),
            torch.tensor([500, 500], device=device),
            encoder_hidden_states=torch.randn(2, 77, pipe.text_encoder.config.hidden_size, device=device, dtype=dtype),
        )
    flops_per_image = counter.get_total_flops() * args.gen_steps  # a step of one image: its CFG pair through the UNet
    rows = []
    for batch in args.gen_batches:
        calls = max(1, args.gen_images // batch)

        def call(seed: int, batch=batch):
            generator = torch.Generator(device).manual_seed(seed)
            pipe([PROMPT] * batch, num_inference_steps=args.gen_steps, guidance_scale=7.5, generator=generator)

        with Memory(device) as memory:
            call(0)
            times = []
            for i in range(calls):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                call(i + 1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        images_per_s = batch / statistics.median(times)
        name = f"generation, batch {batch}, {args.gen_steps} DPM-Solver++ steps, guidance 7.5"
        rows.append(report(name, images_per_s, flops_per_image, memory, peak))
    return rows


def training_ratio(model: Path, data: Path, work: Path, args) -> dict:
    """``bench_train.py`` on this check's model, data, resolution and precision: diffusers' script and LesionGen
    (uncached, cached, and cached compiled with ``--torch_compile``) in fresh processes, the per-run summary."""
    import bench_train

    variants = ["uncached", "cached"] + (["cached, compiled"] if args.torch_compile else [])
    figures = work / "training-ratio.json"
    bench_train.main(
        ["--reference", args.reference, "--data", str(data), "--model", str(model)]
        + ["--resolution", str(args.resolution), "--mixed_precision", args.mixed_precision, "--threads", "0"]
        + ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rounds", str(args.ratio_rounds)]
        + ["--variants", *variants, "--json", str(figures)]
    )
    return json.loads(figures.read_text())["summary"]


def generation_ratio(model: Path, args) -> dict:
    """``bench_generate.py`` on this check's model and device: the original loop against ``generate()`` at the
    largest ``--gen_batches`` (and compiled, with ``--torch_compile``)."""
    import bench_generate

    argv = ["--model_path", str(model), "--resolution", str(args.resolution), "--device", args.device]
    argv += ["--images", str(args.gen_images), "--batch_sizes", str(max(args.gen_batches))]
    argv += ["--repeats", str(args.ratio_rounds)] + (["--torch_compile"] if args.torch_compile else [])
    return bench_generate.main(argv)


def print_ratios(training: dict | None, generation: dict | None) -> None:
    """The speed goals' ratios, last, so they are in the tail of a long log."""
    for name, figures in (training or {}).items():
        if name != "reference":
            wall = figures["steps_per_s"]
            print(
                f"  training, LesionGen {name}: {wall['ratio']:.2f}x diffusers' script "
                f"(median of the rounds' ratios {wall['paired_ratio']:.2f}x)"
            )
    if generation:
        rates = generation["images_per_s_and_per_cpu_s"]
        base = rates[generation["baseline"]][0]
        for name, (wall, _) in rates.items():
            if name != generation["baseline"]:
                print(f"  generation, {name}: {wall / base:.2f}x the original loop")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="sd1", choices=("sd1", "tiny"))
    p.add_argument("--resolution", type=int, default=None, help="default: 512 for sd1, 64 for tiny")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--mixed_precision", default=None, choices=("no", "bf16", "fp16"), help="default: bf16 on cuda")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (the original train_lora.sh default)")
    p.add_argument("--steps", type=int, default=12, help="timed optimiser steps per training run")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per training run")
    p.add_argument("--images", type=int, default=64, help="synthetic training images")
    p.add_argument("--workers", type=int, default=4, help="image decoding workers (uncached runs, cache build)")
    p.add_argument(
        "--torch_compile", action="store_true", help="the ratios also time compiled runs (minutes of compiling)"
    )
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to run (default: all)")
    p.add_argument(
        "--reference",
        default=None,
        help="diffusers' train_text_to_image_lora.py, for the training ratio (needs datasets)",
    )
    p.add_argument("--ratio_rounds", type=int, default=1, help="alternating rounds of each ratio benchmark")
    p.add_argument("--gen_batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--gen_images", type=int, default=32, help="images timed per batch size")
    p.add_argument("--gen_steps", type=int, default=25)
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--work", default=None, help="model, data and runs go here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.reference and not Path(args.reference).is_file():
        p.error(
            f"--reference: no file {args.reference}; clone github.com/huggingface/diffusers and pass its "
            "examples/text_to_image/train_text_to_image_lora.py"
        )
    args.resolution = args.resolution or (512 if args.size == "sd1" else 64)
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # train()'s Accelerator then stays on the CPU even beside a GPU

    import tempfile

    import torch

    from lesiongen.devices import torch_dtype
    from lesiongen.diffusion.tiny import build_tiny_pipeline

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --size tiny --device cpu for the dry run")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    dtype = torch_dtype(args.mixed_precision)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")
    peak = peak_tflops(device, args.peak_tflops)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work or tmp)
        model = work / f"{args.size}-{args.resolution}"
        if not (model / "model_index.json").is_file():
            build_tiny_pipeline(model, resolution=args.resolution, size=args.size)
        data = synthetic_images(work / "data", args.images)
        print(f"model and data ready in {time.perf_counter() - start:.0f} s", flush=True)
        rows: list[dict] = []
        if "check" in args.parts:
            flops = unet_training_flops(model, args, device, dtype)
            rows = train_runs(model, data, work, args, device, flops, peak)
            rows += generation_runs(model, args, device, dtype, peak)
        training = None
        if "training-ratio" in args.parts:
            if args.reference:
                training = training_ratio(model, data, work, args)
            else:
                print("training ratio skipped: pass --reference PATH to diffusers' train_text_to_image_lora.py")
        generation = generation_ratio(model, args) if "generation-ratio" in args.parts else None

    print("\n" + describe(PACKAGES))
    print(
        f"{args.size} random weights, {args.resolution} px, {dtype}, LoRA rank {args.rank}, gradient "
        f"checkpointing, 4 images per step, {args.steps} timed steps; dense bf16 peak "
        f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown (pass --peak_tflops)'}; total {time.perf_counter() - start:.0f} s"
    )
    for r in rows:
        rate = f"{r['steps_per_s']:.2f} steps/s, " if "steps_per_s" in r else ""
        share = f" ({100 * r['utilisation']:.0f}% of peak)" if r["utilisation"] is not None else ""
        print(
            f"  {r['run']:58s} {rate}{r['images_per_s']:.2f} images/s, {r['memory_label']} {r['memory_gib']:.2f} GiB, "
            f"UNet {r['tflops']:.3g} TFLOP/s{share}"
        )
    for cached in ("cached", "uncached") if rows else ():
        base = next(r for r in rows if r["run"] == f"LoRA {cached}, 1 x 4")
        auto = next(r for r in rows if r["run"].startswith(f"LoRA {cached}, auto"))
        print(f"  automatic micro-batch, {cached}: {auto['steps_per_s'] / base['steps_per_s']:.2f}x batch 1 x 4")
    print_ratios(training, generation)
    if args.json:
        figures = {"versions": describe(PACKAGES), "rows": rows, "training_ratio": training}
        Path(args.json).write_text(json.dumps(figures | {"generation_ratio": generation}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
