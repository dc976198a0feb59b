"""LoRA training speed: diffusers' reference script against LesionGen at identical settings, in one run.

Every run is a fresh child process on the same pinned core(s), and the runs alternate over several
rounds, so a shared machine's load falls on all of them alike; the figures are per-setting medians. The
settings are the ones both scripts take: batch 4, accumulation 1, LoRA rank 4, learning rate 1e-4
(constant), gradient checkpointing, centre crop and random flip, float32, no validation or checkpoints,
TensorBoard logging. The reference is diffusers' ``examples/text_to_image/train_text_to_image_lora.py``,
run unmodified (``--reference PATH``; it is not part of LesionGen: clone github.com/huggingface/diffusers).

Steps/s counts the steps after ``--warmup`` (the reference's per-step TensorBoard wall times; LesionGen's
``TrainResult.step_seconds``), so cache building, model loading and compilation are reported apart. The
compiled runs share a fresh inductor cache: the first pays the cold compile, later rounds reuse it, as a
user's second run would; the time of each run's first steps is printed.

    python benchmarks/bench_train.py --reference diffusers/examples/text_to_image/train_text_to_image_lora.py \\
        --data CAPTIONS/train --cores 1                # real Derm7pt train images, tiny model, 64 px, one core
    python benchmarks/bench_train.py --data CAPTIONS/train --size sd1 --resolution 512 --mixed_precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> LesionGen flags on top of the shared settings; "reference" is the diffusers script
VARIANTS = {
    "uncached": ["--cache_latents", "false"],
    "cached": ["--cache_latents", "true"],
    "cached, compiled": ["--cache_latents", "true", "--torch_compile", "true"],
    "uncached, compiled": ["--cache_latents", "false", "--torch_compile", "true"],
}


def shared_flags(args, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    """The flags both scripts spell alike (diffusers spellings), with every value given explicitly."""
    flags = [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
        "--resolution", str(args.resolution), "--center_crop", "--random_flip",
        "--train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1", "--rank", str(args.rank),
        "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps), "--checkpointing_steps", "1000000", "--seed", "0",
        "--mixed_precision", args.mixed_precision, "--report_to", "tensorboard", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    return flags + (["--gradient_checkpointing"] if args.gradient_checkpointing else [])


def child_env(args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def pinned(args, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", args.cores, *cmd] if args.cores else cmd


def run_reference(args, model: Path, data: Path, out: Path) -> dict:
    """The diffusers script as a user runs it; steps/s from the wall times of its per-step TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = args.warmup + args.steps
    cmd = [sys.executable, args.reference, *shared_flags(args, model, data, out, steps), "--caption_column", "text"]
    env = {**child_env(args), "HF_DATASETS_CACHE": str(out.parent / "hf-datasets")}
    start = time.perf_counter()
    proc = subprocess.run(pinned(args, cmd), env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"reference script failed:\n{proc.stderr[-3000:]}")
    events = EventAccumulator(str(out / "logs" / "text2image-fine-tune"))
    events.Reload()
    walls = [e.wall_time for e in events.Scalars("train_loss")]
    assert len(walls) == steps, len(walls)
    timed = walls[-1] - walls[args.warmup - 1]
    return {"steps_per_s": args.steps / timed, "warmup_s": walls[args.warmup - 1] - walls[0], "total_s": total}


def run_lesiongen(args, model: Path, data: Path, out: Path, extra: list[str]) -> dict:
    """``lesiongen.diffusion.train`` in a child through ``--run_child``; steps/s from its step wall times."""
    flags = shared_flags(args, model, data, out, args.warmup + args.steps) + ["--validation_steps", "0", *extra]
    flags += ["--mode", args.mode, "--cache_dir", str(out.parent / "latent-cache")]
    if args.micro_batch_size:
        flags += ["--micro_batch_size", args.micro_batch_size]
    cmd = [sys.executable, __file__, "--run_child", json.dumps(flags)]
    env = {**child_env(args), "TORCHINDUCTOR_CACHE_DIR": str(out.parent / "inductor-cache")}
    start = time.perf_counter()
    proc = subprocess.run(pinned(args, cmd), env=env, capture_output=True, text=True, cwd=REPO)
    total = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"lesiongen run failed:\n{proc.stderr[-3000:]}")
    seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "steps_per_s": args.steps / sum(seconds[args.warmup :]),
        "warmup_s": sum(seconds[: args.warmup]),
        "total_s": total,
    }


def run_child(flags: list[str]) -> None:
    """Inside the child: train, then print the step wall times as the last line."""
    import torch

    from lesiongen.cli import parse_config
    from lesiongen.diffusion.train import TrainConfig, train

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(parse_config(TrainConfig, flags))
    print(json.dumps(result.step_seconds))


def versions(args) -> str:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    return (
        f"{platform.platform()}, Python {platform.python_version()}, {device}, cores {args.cores or 'any'}, "
        f"OMP threads {args.threads or 'default'}, load average {os.getloadavg()[0]:.1f}\n"
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"accelerate {accelerate.__version__}, peft {peft.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="diffusers' train_text_to_image_lora.py (omit to time LesionGen only)")
    p.add_argument("--data", required=False, help="imagefolder with metadata.jsonl (file_name, text)")
    p.add_argument("--model", help="pipeline folder (default: build one with lesiongen.diffusion.tiny at --size)")
    p.add_argument("--size", default="tiny", choices=("tiny", "sd1"))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--mode", default="lora", choices=("lora",), help=argparse.SUPPRESS)
    p.add_argument("--micro_batch_size", default=None, help="LesionGen's --micro_batch_size (default: batch_size)")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient_checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per run (compilation happens here)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--cores", default=None, help="taskset core list for every run, e.g. 1 (default: any)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (0: torch's default)")
    p.add_argument("--run_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_child:
        run_child(json.loads(args.run_child))
        return 0
    if not args.data:
        p.error("--data is required (an imagefolder with metadata.jsonl, e.g. build_captions' OUT/train)")

    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        if args.model:
            model = Path(args.model)
        else:
            from lesiongen.diffusion.tiny import build_tiny_pipeline

            model = build_tiny_pipeline(tmp / "model", resolution=args.resolution, size=args.size)
        data = Path(args.data)
        names = (["reference"] if args.reference else []) + args.variants
        for r in range(args.rounds):
            for name in names:
                out = tmp / f"{r}-{name.replace(', ', '-')}"
                if name == "reference":
                    row = run_reference(args, model, data, out)
                else:
                    row = run_lesiongen(args, model, data, out, VARIANTS[name])
                rows.setdefault(name, []).append(row)
                print(json.dumps({"round": r, "run": name, **row}), flush=True)

    print("\n" + versions(args))
    print(
        f"model {args.model or args.size}, LoRA rank {args.rank}, {args.resolution} px, batch {args.batch_size}, "
        f"gradient checkpointing {args.gradient_checkpointing}, precision {args.mixed_precision}, "
        f"{args.steps} timed steps after {args.warmup}, {args.rounds} rounds, data {args.data}"
    )
    ref = statistics.median(r["steps_per_s"] for r in rows["reference"]) if "reference" in rows else None
    for name, runs in rows.items():
        speed = statistics.median(r["steps_per_s"] for r in runs)
        ratio = f", {speed / ref:.2f}x the reference" if ref and name != "reference" else ""
        label = "diffusers reference" if name == "reference" else f"LesionGen {name}"
        spread = ", ".join(f"{r['steps_per_s']:.2f}" for r in runs)
        warmup = statistics.median(r["warmup_s"] for r in runs)
        print(f"  {label:30s} {speed:5.2f} steps/s (runs: {spread}){ratio}; first {args.warmup} steps {warmup:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
