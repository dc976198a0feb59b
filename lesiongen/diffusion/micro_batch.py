"""``--micro_batch_size auto``: split a step's images into the fastest micro-batch that fits.

The original settings (batch 1 x accumulation 4) leave a GPU mostly idle. Because every item draws its
own noise (``loss.item_generators``) and the sampler plans items per optimiser step, any micro-batch
that divides the step's images trains on the same items with the same noise: only speed and memory
change. So the choice is made by trial: a forward and backward pass at each candidate size, the
largest first, keeping the one with the most images per second among those that fit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..errors import InputError

# A trial that peaks above this share of the GPU's memory counts as not fitting: validation, the
# allocator's fragmentation and a longer caption batch need the rest.
GPU_MEMORY_HEADROOM = 0.9
TRIAL_REPEATS = 2  # timed passes per candidate, after one untimed warm-up pass


def divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(trial: Callable[[int], None], size: int, device: torch.device) -> float:
    """Images per second of ``trial(size)`` (one forward and backward pass), or 0.0 if it does not fit."""
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trial(size)
        times = []
        for _ in range(TRIAL_REPEATS):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            trial(size)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        if cuda and torch.cuda.max_memory_allocated(device) > GPU_MEMORY_HEADROOM * torch.cuda.mem_get_info(device)[1]:
            return 0.0
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not is_out_of_memory(e):
            raise
        if cuda:
            torch.cuda.empty_cache()
        return 0.0
    return size / min(times)


def choose_micro_batch(
    per_step: int,
    trial: Callable[[int], None],
    device: torch.device,
    agree: Callable[[float], float] = lambda rate: rate,
) -> tuple[int, dict[int, float]]:
    """(micro-batch size, images/s of each candidate tried).

    Candidates are the divisors of ``per_step``, largest first; the search stops once a smaller size
    is slower than the best so far. ``agree`` combines one rate across processes (the slowest one
    counts), so every process makes the same choice and their accumulation steps stay in step.
    """
    rates: dict[int, float] = {}
    for size in divisors_desc(per_step):
        rates[size] = agree(measure(trial, size, device))
        fitting = [r for r in rates.values() if r > 0]
        if rates[size] > 0 and rates[size] < max(fitting):
            break
    best = max(rates, key=lambda s: (rates[s], s))
    if rates[best] <= 0:
        raise InputError(
            "--micro_batch_size auto",
            f"not even one image per micro-batch fits in {device} memory",
            "use --gradient_checkpointing, --mixed_precision bf16 or a lower --resolution",
        )
    return best, rates


def pick_micro_batch(cfg, per_step: int, dataset, sampler, run_loss, model, params, accelerator) -> int:
    """``--micro_batch_size`` of ``cfg`` (a TrainConfig): as given, train_batch_size when none, or (auto) by trial.

    The trial passes use this process's first step of items, run without gradient sync and leave no
    gradients behind; ``run_loss(batch)`` is the training loss of a collated batch.
    """
    from .dataset import collate

    if cfg.micro_batch_size is None:
        return cfg.train_batch_size
    if cfg.micro_batch_size != "auto":
        return int(cfg.micro_batch_size)
    keys = sampler.step_items(sampler.start_step)

    def trial(size: int) -> None:
        with accelerator.no_sync(model):
            run_loss(collate([dataset[k] for k in keys[:size]])).backward()
        for p in params:
            p.grad = None

    def slowest(rate: float) -> float:
        return accelerator.gather(torch.tensor([rate], device=accelerator.device)).min().item()

    size, rates = choose_micro_batch(per_step, trial, accelerator.device, slowest)
    if accelerator.is_main_process:
        tried = ", ".join(f"{s}: {r:.1f}" for s, r in rates.items())
        print(f"micro-batch {size} of {per_step} images per step (images/s by micro-batch: {tried})")
    return size
