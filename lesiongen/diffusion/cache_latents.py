"""Build a training run's latent cache ahead of training, with every process of a launch encoding its share.

    accelerate launch -m lesiongen.diffusion.cache_latents --pretrained_model_name_or_path MODEL \\
        --train_data_dir CAPTIONS/train --output_dir OUT [--cache_dir DIR] [any other train flag]
    (or --dataset_name NAME in place of --train_data_dir)

It takes ``lesiongen.diffusion.train``'s flags, so the cache it writes is the one that training run
opens without encoding anything. Rerun after a kill to finish the missing shards.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

from ..cli import run_stage
from .config import TrainConfig


@dataclass(frozen=True)
class CacheReport:
    images: int
    shards_written: int  # by all processes of this call
    seconds: float
    peak_rss_mib: float  # the largest of the processes'


def build_cache(cfg: TrainConfig) -> CacheReport:
    """Load the frozen encoders as training places them, then build what is missing of the cache."""
    import torch
    from accelerate.utils import gather_object

    from .latent_cache import open_cache
    from .pipeline import load_training_parts
    from .train import make_accelerator, weight_dtype
    from .train_data import load_examples

    accelerator = make_accelerator(cfg)
    parts = load_training_parts(cfg.pretrained_model_name_or_path, cfg.model_family)
    family = parts["family"]
    examples, _ = load_examples(cfg, parts)
    dtype = weight_dtype(accelerator)
    for name in ("vae", *family.text_encoders):
        parts[name].requires_grad_(False).to(accelerator.device, dtype)
    with_text = not (cfg.mode == "full" and cfg.train_text_encoder)
    before = time.perf_counter()
    with torch.no_grad():
        dataset = open_cache(cfg, examples, parts, accelerator, with_text, dtype)
    seconds = time.perf_counter() - before
    written = sum(gather_object([dataset.shards_written]))
    peak = max(gather_object([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
    report = CacheReport(len(examples), written, seconds, peak)
    if accelerator.is_main_process:
        print(
            f"latent cache {dataset.layout.folder}: {report.images} images in {dataset.layout.n_shards} shards, "
            f"{written} written by {accelerator.num_processes} process(es) in {seconds:.1f} s, "
            f"peak RSS {peak:.0f} MiB per process"
        )
    accelerator.end_training()
    return report


def main(argv: list[str] | None = None) -> int:
    prog, reads = "python -m lesiongen.diffusion.cache_latents", ("pretrained_model_name_or_path", "train_data_dir")
    return run_stage(
        build_cache, TrainConfig, argv, prog, "diffusion training", reads=reads, tables=("train_data_dir",)
    )


if __name__ == "__main__":
    sys.exit(main())
