"""LoRA training speed: diffusers' reference script against LesionGen at identical settings, in one run.

Every run is a fresh child process on the same pinned core(s), and the runs alternate over several
rounds, so a shared machine's load falls on all of them alike; the figures are per-setting medians. The
settings are the ones both scripts take: batch 4, accumulation 1, LoRA rank 4, learning rate 1e-4
(constant), gradient checkpointing, centre crop and random flip, float32, no validation or checkpoints,
TensorBoard logging. The reference is diffusers' ``examples/text_to_image/train_text_to_image_lora.py``,
run unmodified (``--reference PATH``; it is not part of LesionGen: clone github.com/huggingface/diffusers).

Steps/s counts the steps after ``--warmup``, timed alike for both trainers at each update of their
per-step progress bar, by wall time and by the process's CPU time (the steadier figure where other jobs
share the core); model loading, cache building and compilation fall in the first steps, reported apart. The
compiled runs share a fresh inductor cache: the first pays the cold compile, later rounds reuse it, as a
user's second run would; the time of each run's first steps is printed.

    python benchmarks/bench_train.py --reference diffusers/examples/text_to_image/train_text_to_image_lora.py \\
        --data CAPTIONS/train --cores 1                # real Derm7pt train images, tiny model, 64 px, one core
    python benchmarks/bench_train.py --data CAPTIONS/train --size sd1 --resolution 512 --mixed_precision bf16
    python benchmarks/bench_train.py --data CAPTIONS/train --families sd1 sd2 sdxl sd3 flux --variants cached
    python benchmarks/bench_train.py --size real --families sdxl flux     # a GPU: one LoRA step at native shapes

``--families`` times each family's tiny build (the diffusers reference runs for sd1 only) and reports every
run's peak memory (resident set, and CUDA allocations on a GPU). ``--size real`` needs a GPU and no data: it
builds each family's denoiser at the released model's shapes with random weights, in bf16, and times LoRA
steps on random cached latents and text embeddings at the native resolution, as training runs once the cache
is built (text encoders and VAE released); the weights the cache build needs besides are counted from the
encoders' configs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe

from lesiongen.diffusion.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
# name -> LesionGen flags on top of the shared settings; "reference" is the diffusers script
VARIANTS = {
    "uncached": ["--cache_latents", "false", "--torch_compile", "false"],
    "cached": ["--cache_latents", "true", "--torch_compile", "false"],
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
    # the repository first, then what the caller had (a GPU machine's carried wheels, say)
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def pinned(args, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", args.cores, *cmd] if args.cores else cmd


# The per-optimiser-step progress bars of the reference script ("Steps") and of lesiongen.diffusion.train.
STEP_BARS = ("Steps", "train")


def observe_steps() -> list[tuple[float, float]]:
    """(wall, CPU) seconds at every update of a trainer's step progress bar, filled in as training runs.

    Both trainers update their bar once per optimiser step, so the same observer times both without
    changing either; CPU seconds are the steadier figure where other jobs share the core.
    """
    import tqdm.std

    marks: list[tuple[float, float]] = []
    update = tqdm.std.tqdm.update

    def observed(self, n=1):
        out = update(self, n)
        if getattr(self, "desc", None) in STEP_BARS:  # disabled bars (torch.fx uses some) have no desc
            marks.append((time.perf_counter(), time.process_time()))
        return out

    tqdm.std.tqdm.update = observed
    return marks


def peak_memory() -> dict:
    """This process's peak resident set and, on a GPU, its peak CUDA allocation (MiB)."""
    import resource

    import torch

    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def run_child(kind: str, flags: list[str]) -> None:
    """Inside the child: install the observer, train (the reference script as __main__, or LesionGen), print
    marks and peak memory."""
    marks = observe_steps()
    if kind == "reference":
        import runpy

        sys.argv = flags
        runpy.run_path(flags[0], run_name="__main__")
    else:
        from lesiongen.cli import parse_config
        from lesiongen.diffusion.train import TrainConfig, train

        train(parse_config(TrainConfig, flags))
    print(json.dumps({"marks": marks, **peak_memory()}))


def timed_run(args, kind: str, flags: list[str], env: dict) -> dict:
    """One child run; steps/s by wall and CPU time over the steps after the warm-up."""
    cmd = [sys.executable, __file__, "--run_child", kind, json.dumps(flags)]
    start = time.perf_counter()
    proc = subprocess.run(pinned(args, cmd), env=env, capture_output=True, text=True, cwd=REPO)
    total = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    marks = report.pop("marks")
    assert len(marks) == args.warmup + args.steps, (kind, len(marks))
    (wall0, cpu0), (wall1, cpu1) = marks[args.warmup - 1], marks[-1]
    return {
        "steps_per_s": args.steps / (wall1 - wall0),
        "steps_per_cpu_s": args.steps / (cpu1 - cpu0),
        "warmup_s": wall0 - start,
        "total_s": total,
        **report,
    }


def run_reference(args, model: Path, data: Path, out: Path) -> dict:
    """The diffusers script, unmodified, as a user runs it."""
    flags = [
        args.reference,
        *shared_flags(args, model, data, out, args.warmup + args.steps),
        "--caption_column",
        "text",
    ]
    env = {**child_env(args), "HF_DATASETS_CACHE": str(out.parent / "hf-datasets")}
    return timed_run(args, "reference", flags, env)


def run_lesiongen(args, model: Path, data: Path, out: Path, extra: list[str]) -> dict:
    """``lesiongen.diffusion.train`` with the same flags, plus its own (cache, compile, micro-batch)."""
    flags = shared_flags(args, model, data, out, args.warmup + args.steps) + ["--validation_steps", "0", *extra]
    flags += ["--mode", args.mode, "--cache_dir", str(out.parent / "latent-cache")]
    if args.micro_batch_size:
        flags += ["--micro_batch_size", args.micro_batch_size]
    env = {**child_env(args), "TORCHINDUCTOR_CACHE_DIR": str(out.parent / "inductor-cache")}
    return timed_run(args, "lesiongen", flags, env)


def summarise(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per run and per clock (wall, CPU): the median rate and, beside a reference, its ratio to the reference's
    median and the median of the rounds' paired ratios."""
    summary: dict[str, dict] = {}
    for name, runs in rows.items():
        summary[name] = {}
        for key in ("steps_per_s", "steps_per_cpu_s"):
            figures = {"median": statistics.median(r[key] for r in runs)}
            if "reference" in rows and name != "reference":
                references = rows["reference"]
                figures["ratio"] = figures["median"] / statistics.median(r[key] for r in references)
                # each round's runs are minutes apart, so their ratio is steadier than the ratio of medians
                # where the host's speed drifts (it has varied by up to 1.8x within an hour)
                figures["paired_ratio"] = statistics.median(
                    r[key] / ref[key] for r, ref in zip(runs, references, strict=True)
                )
            summary[name][key] = figures
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", help="diffusers' train_text_to_image_lora.py (omit to time LesionGen only)")
    p.add_argument("--data", required=False, help="imagefolder with metadata.jsonl (file_name, text)")
    p.add_argument("--model", help="pipeline folder (default: build one with lesiongen.diffusion.tiny at --size)")
    p.add_argument(
        "--size", default="tiny", choices=("tiny", "sd1", "real"), help="real: native shapes per family (GPU)"
    )
    p.add_argument("--families", nargs="+", default=["sd1"], choices=list(FAMILIES), help="model families to time")
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
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--run_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_child:
        run_child(args.run_child[0], json.loads(args.run_child[1]))
        return 0
    if args.size == "real":
        from real_shapes import run_real

        return run_real(args)
    if not args.data:
        p.error("--data is required (an imagefolder with metadata.jsonl, e.g. build_captions' OUT/train)")

    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        models = {}
        for family in args.families:
            if args.model:
                models[family] = Path(args.model)
            else:
                from lesiongen.diffusion.tiny import build_tiny_pipeline

                models[family] = build_tiny_pipeline(
                    tmp / f"model-{family}", resolution=args.resolution, size=args.size, family=family
                )
        data = Path(args.data)
        # diffusers' reference script trains SD 1.x-style pipelines only
        runs = [("sd1", "reference")] if args.reference and "sd1" in args.families else []
        runs += [(family, name) for family in args.families for name in args.variants]
        for r in range(args.rounds):
            for family, name in runs:
                out = tmp / f"{r}-{family}-{name.replace(', ', '-')}"
                if name == "reference":
                    row = run_reference(args, models[family], data, out)
                else:
                    row = run_lesiongen(args, models[family], data, out, VARIANTS[name])
                label = name if name == "reference" else f"{family} {name}"
                rows.setdefault(label, []).append(row)
                print(json.dumps({"round": r, "run": label, **row}), flush=True)

    print(
        "\n"
        + describe(
            ("torch", "diffusers", "transformers", "accelerate", "peft"),
            f"cores {args.cores or 'any'}, OMP threads {args.threads or 'default'}",
        )
    )
    print(
        f"model {args.model or args.size}, families {' '.join(args.families)}, LoRA rank {args.rank}, {args.resolution} px, batch {args.batch_size}, "
        f"gradient checkpointing {args.gradient_checkpointing}, precision {args.mixed_precision}, "
        f"{args.steps} timed steps after {args.warmup}, {args.rounds} rounds, data {args.data}"
    )
    summary = summarise(rows)
    for key, unit in (("steps_per_s", "steps/s"), ("steps_per_cpu_s", "steps per CPU-second")):
        print(f"by {'wall' if key == 'steps_per_s' else 'CPU'} time:")
        for name, runs in rows.items():
            figures = summary[name][key]
            ratio = ""
            if "ratio" in figures:
                ratio = f", {figures['ratio']:.2f}x the reference (median of the rounds' ratios {figures['paired_ratio']:.2f}x)"
            label = "diffusers reference" if name == "reference" else f"LesionGen {name}"
            spread = ", ".join(f"{r[key]:.2f}" for r in runs)
            print(f"  {label:30s} {figures['median']:5.2f} {unit} (runs: {spread}){ratio}")
    for name, runs in rows.items():
        firsts = ", ".join(f"{r['warmup_s']:.0f}" for r in runs)
        print(f"  time from start to the end of step {args.warmup}, {name}: {firsts} s")
    print("peak memory (median over runs):")
    for name, runs in rows.items():
        rss = statistics.median(r["peak_rss_mib"] for r in runs)
        cuda = [r["peak_cuda_mib"] for r in runs if "peak_cuda_mib" in r]
        on_gpu = f", CUDA {statistics.median(cuda):.0f} MiB" if cuda else ""
        print(f"  {name:30s} resident {rss:.0f} MiB{on_gpu}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
