"""How synthetic images join the real ones in a classifier run: the mixing recipes of issue 34.

A fixed number per real image (--synthetic_ratio), a share of each batch or epoch (--synthetic_share),
real-anchored swaps of a real image for one of its own variants (--swap_probability), and a second stage on
real images only (--finetune_epochs). Variants are tied to their real image by the generation manifest's
``source`` column, resolved to a file, so a variant of an image the run does not train on never enters it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import labels
from ..errors import InputError
from .config import ClassifierSettings, ClassifyConfig
from .data import class_weights, targets

# The generation manifest's column naming the real image a variant was made from (generate.py --mode augment).
SOURCE = "source"


def sample_synthetic(synthetic: pd.DataFrame, n_real: int, ratio: float | None, seed: int) -> tuple[pd.DataFrame, str]:
    """``ratio`` synthetic images per real one (all when None), drawn with a fixed seed."""
    if ratio is None:
        return synthetic, f"all {len(synthetic)} synthetic images"
    want = int(round(ratio * n_real))
    if want >= len(synthetic):
        return (
            synthetic,
            f"asked for {want} synthetic images ({ratio} per real), only {len(synthetic)} exist: using all",
        )
    note = f"{want} of {len(synthetic)} synthetic images ({ratio} per real)"
    return synthetic.sample(n=want, random_state=seed), note


def resolved_sources(synthetic: pd.DataFrame) -> pd.Series:
    """Each row's ``source`` as a resolved file path ('' where it names none): a relative source is read from
    its manifest's folder, else from the working directory, and links are followed, so a variant matches its
    real image however either path was spelled."""
    if SOURCE not in synthetic.columns:
        return pd.Series("", index=synthetic.index)

    def resolve(value, table) -> str:
        if not isinstance(value, str) or not value.strip():
            return ""
        path = Path(value.strip())
        if not path.is_absolute() and (Path(table).parent / path).exists():
            path = Path(table).parent / path
        return os.path.realpath(path)

    return pd.Series(
        [resolve(v, t) for v, t in zip(synthetic[SOURCE], synthetic["table"], strict=True)], synthetic.index
    )


def without_leaks(real_train: pd.DataFrame, synthetic: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The synthetic rows this run may train on: a variant whose source is not one of its real training images
    (a validation or test image, a held-out fold's) would carry that image into training, so it is dropped and
    counted. Each kept variant gets ``source_row``, the position of its real image in ``real_train`` (-1: none)."""
    sources = resolved_sources(synthetic)
    position = {p: i for i, p in enumerate(os.path.realpath(p) for p in real_train["path"])}
    rows = np.array([position.get(s, -1) for s in sources], dtype=np.int64)
    leaks = (sources != "").to_numpy() & (rows < 0)
    kept = synthetic[~leaks].assign(source_row=rows[~leaks])
    if not leaks.any():
        return kept, None
    return kept, (
        f"left out {int(leaks.sum())} synthetic variant(s) whose '{SOURCE}' is not a real training image of this run"
    )


def assemble(
    real_train: pd.DataFrame, synthetic: pd.DataFrame | None, settings: ClassifierSettings, mode: str, seed: int
) -> tuple[pd.DataFrame, str | None]:
    """The training rows for real/synthetic/mixed, plus a note on how many synthetic images were used.

    With --synthetic_share or --swap_probability the synthetic rows are the pool each epoch draws from
    (``epoch_frame``); with --finetune_epochs a synthetic-only run keeps the real rows for its second stage.
    """
    if mode == "real":
        return real_train, None
    synthetic, leaked = without_leaks(real_train, synthetic)
    if synthetic.empty:
        raise InputError(
            "--synthetic_dir",
            f"every synthetic image is a variant of a real image this run does not train on ({leaked})",
            "make the variants from the train split of this --data_dir",
        )
    if settings.swap_probability > 0 and mode == "mixed":
        synthetic = synthetic[synthetic["source_row"] >= 0]
        if synthetic.empty:
            raise InputError(
                "--swap_probability",
                f"no synthetic image names a real training image in its '{SOURCE}' column",
                "make variants of this --data_dir's train split with generate.py --mode augment",
            )
        covered = synthetic["source_row"].nunique()
        syn, note = synthetic, f"{len(synthetic)} variants of {covered} of {len(real_train)} real training images"
    elif settings.synthetic_share is not None and mode == "mixed":
        syn = synthetic
        note = f"{settings.synthetic_share:.0%} synthetic per {settings.share_per}, drawn from {len(synthetic)} images"
    else:
        syn, note = sample_synthetic(synthetic, len(real_train), settings.synthetic_ratio, seed)
    note = "; ".join(filter(None, [note, leaked]))
    syn = syn.assign(origin="synthetic")
    if mode == "synthetic" and not settings.finetune_epochs:
        return syn.reset_index(drop=True), note
    return pd.concat([real_train, syn], ignore_index=True), note


def swap(real: pd.DataFrame, variants: pd.DataFrame, p: float, rng: np.random.Generator) -> pd.DataFrame:
    """Each real row replaced with probability ``p`` by one of its own variants, drawn uniformly; a real image
    without variants stays. The epoch keeps one image per real one, so the real set's size and classes hold."""
    by_source = variants.groupby("source_row").indices
    picks = np.arange(len(real))
    for i in np.flatnonzero(rng.random(len(real)) < p):
        choices = by_source.get(i)
        if choices is not None:
            picks[i] = len(real) + choices[rng.integers(len(choices))]
    return pd.concat([real, variants], ignore_index=True).iloc[picks].reset_index(drop=True)


def epoch_frame(frame: pd.DataFrame, cfg: ClassifyConfig, epoch: int) -> pd.DataFrame:
    """The rows epoch ``epoch`` (0-based) trains on: after --epochs, the real ones alone (fine-tuning); before,
    the --train set, with this epoch's swaps drawn with a seed of its own, so a resumed run draws what the
    uninterrupted one drew (--synthetic_share is drawn by ``share_batches``). Otherwise that is ``frame`` itself."""
    real = frame[frame["origin"] == "real"]
    synthetic = frame[frame["origin"] != "real"]
    if epoch >= cfg.epochs:
        return real.reset_index(drop=True)
    if cfg.train == "synthetic":
        return synthetic.reset_index(drop=True)
    if cfg.swap_probability > 0:
        return swap(real, synthetic, cfg.swap_probability, np.random.default_rng([cfg.seed, epoch]))
    return frame


def draw(frame: pd.DataFrame, n: int, weighted: bool, generator: torch.Generator) -> list[int]:
    """``n`` row positions of ``frame``: class-balanced draws with replacement, or shuffled passes over it."""
    if weighted:
        y = targets(frame)
        weights = torch.as_tensor(class_weights(y, len(labels.CODES))[y], dtype=torch.double)
        return torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    passes = -(-n // len(frame))
    return torch.cat([torch.randperm(len(frame), generator=generator) for _ in range(passes)])[:n].tolist()


def share_batches(frame: pd.DataFrame, cfg: ClassifyConfig, generator: torch.Generator) -> list[list[int]]:
    """Batches that hold --synthetic_share synthetic images: each batch exactly round(share x --batch_size)
    (--share_per batch), or the epoch as a whole (--share_per epoch: its images shuffled together, complete
    batches only when there are several). An epoch draws as many real images as there are; under --balance
    sampler the draws are class-balanced within the real and within the synthetic images."""
    is_real = (frame["origin"] == "real").to_numpy()
    real, synthetic = np.flatnonzero(is_real), np.flatnonzero(~is_real)
    weighted = cfg.balance == "sampler"
    if cfg.share_per == "batch":
        k = round(cfg.synthetic_share * cfg.batch_size)
        step = cfg.batch_size - k
        n_batches = max(1, len(real) // step)
        real_order = real[draw(frame.iloc[real], n_batches * step, weighted, generator)]
        synthetic_order = synthetic[draw(frame.iloc[synthetic], n_batches * k, weighted, generator)]
        return [
            [*real_order[b * step : (b + 1) * step].tolist(), *synthetic_order[b * k : (b + 1) * k].tolist()]
            for b in range(n_batches)
        ]
    n_synthetic = round(len(real) * cfg.synthetic_share / (1 - cfg.synthetic_share))
    order = np.concatenate(
        [
            real[draw(frame.iloc[real], len(real), weighted, generator)],
            synthetic[draw(frame.iloc[synthetic], n_synthetic, weighted, generator)],
        ]
    )[torch.randperm(len(real) + n_synthetic, generator=generator).numpy()]
    n_batches = max(1, len(order) // cfg.batch_size)
    return [order[b * cfg.batch_size : (b + 1) * cfg.batch_size].tolist() for b in range(n_batches)]
