"""Test data builders shared by several test modules (the session fixtures in conftest.py use them)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lesiongen import labels
from lesiongen.captions.build import main as build_captions

# Typed out rather than imported, so a change to generate.py's columns shows up as a failing test.
MANIFEST_COLUMNS = [
    "file_name", "text", "label", "condition", "dx", "sex", "age", "age_bin", "site", "site_group", "skin_tone",
    *labels.CONCEPT_NAMES, "concept_source", "seed", "guidance_scale", "num_inference_steps", "scheduler", "model",
    "negative_prompt", "index", "pair", "contrast", "source", "strength", "lesion_change", "skin_ita_before",
    "skin_ita_after", "skin_spread_after", "valid", "invalid_reason",
]  # fmt: skip


def build_d7p(out: Path, d7p_csv: Path, d7p_images: Path) -> Path:
    """build_captions on all of Derm7pt (official splits; metadata reports only, which keeps it to seconds)."""
    args = ["--dataset", "d7p", "--metadata", str(d7p_csv), "--images", str(d7p_images), "--out", str(out)]
    assert build_captions(args + ["--skip_bad_rows", "--reporter", "metadata"]) == 0
    return out


def write_manifest(folder: Path, rows: list[dict]) -> Path:
    """A generate.py-style output: PNGs under dataset/<Condition>/ and manifest.csv beside them."""
    records = []
    for i, row in enumerate(rows):
        cond = labels.BY_CODE[row["label"]].name if row["label"] in labels.BY_CODE else row["label"]
        name = f"dataset/{cond}/{row['label']}_{i:06d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row.get("pixels", np.full((16, 16, 3), 40 * i % 255, np.uint8))).save(folder / name)
        base = {c: "" for c in MANIFEST_COLUMNS}
        base.update(
            file_name=name, text=f"{cond}, dermoscopic image", label=row["label"], condition=cond, dx=row["label"]
        )
        base.update(
            sex=row.get("sex", "female"), age=row.get("age", 50), age_bin="45-59", site="back", site_group="trunk"
        )
        base.update(skin_tone="unknown", concept_source="imputed", seed=i, guidance_scale=7.5, num_inference_steps=25)
        base.update(scheduler="ddim", model="tiny", index=i, valid="true")
        records.append(base)
    pd.DataFrame(records, columns=MANIFEST_COLUMNS).to_csv(folder / "manifest.csv", index=False)
    return folder


def subset(src: Path, out: Path, per_class: dict[str, int]) -> Path:
    """A build_captions-shaped folder with up to N real images per class and split, symlinked."""
    for split, n in per_class.items():
        rows = [json.loads(line) for line in (src / split / "metadata.jsonl").read_text().splitlines()]
        taken: dict[str, int] = {}
        kept = []
        for row in rows:
            if taken.get(row["label"], 0) < n:
                taken[row["label"]] = taken.get(row["label"], 0) + 1
                dst = out / split / row["file_name"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink((src / split / row["file_name"]).resolve(), dst)
                kept.append(json.dumps(row))
        (out / split / "metadata.jsonl").write_text("\n".join(kept) + "\n")
    return out


def oversized_png(path: Path, side: int = 9500) -> Path:
    """A valid 1-bit PNG of side x side black pixels: about 10 kB on disk, side**2 pixels once decoded.

    9500 px a side (90 M pixels) is just past PIL's decompression-bomb limit (89.5 M), where PIL itself
    only warns; 13400 px and up is where it refuses. Written by hand, because PIL would have to hold the
    whole image in memory to save it.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the packed bits of one row
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def truncated_jpeg(src: Path, dst: Path, keep: float = 0.6) -> Path:
    """The first ``keep`` of a real JPEG: its header parses (``Image.verify`` passes), its pixels do not decode."""
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def failing_compiler(monkeypatch) -> list:
    """Make ``torch.compile`` use a backend that fails on every graph, as a machine without a working compiler
    does; returns the list of graphs it was handed (empty when nothing was compiled)."""
    import torch

    tried = []

    def failing_backend(graph, example_inputs):
        tried.append(graph)
        raise RuntimeError("this backend cannot compile")

    # dynamo remembers code it failed to compile and skips it from then on: forget an earlier test's failures
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=failing_backend))
    return tried


class RunsCode:
    """Unpickling this makes the folder ``marker``: a stand-in for whatever code a crafted pickle could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def perturbed_copy(model_dir: Path, out: Path) -> Path:
    """A copy of a diffusers model with the UNet's conv_in weights changed: the same configs, shapes and file
    sizes, other weights (what a fine-tune of the same base looks like from outside)."""
    import shutil

    shutil.copytree(model_dir, out)
    return perturb(out, "unet", "conv_in.weight")


def perturb(model_dir: Path, component: str, tensor: str) -> Path:
    """Change one tensor of a model's component in place (a model rebuilt or retrained at the same path)."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / component / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors[tensor] = tensors[tensor] + 0.01
    save_file(tensors, weights)
    return model_dir


def small_config(tiny_sd_dir, data_dir, out, **overrides):
    """A 4-step LoRA run of the tiny model at 64 px, batch 2, no validation or trackers (the training tests' base)."""
    from lesiongen.diffusion.train import TrainConfig

    cfg = TrainConfig(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        train_data_dir=str(data_dir),
        output_dir=str(out),
        resolution=64,
        rank=4,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        max_train_steps=4,
        learning_rate=1e-3,
        checkpointing_steps=2,
        validation_steps=0,
        report_to="none",
    )
    return replace(cfg, **overrides)


def write_metrics(path: Path, recall: dict[str, float | None], **fields: dict[str, tuple[float, int]]) -> Path:
    """A metrics.json in classification/eval.py's shape, written by hand: a recall per class, (accuracy, n) per group
    of each field; a group of under 5 images or 'unknown' is not ranked, as eval.py's default marks it."""
    data = {
        "overall": {"per_class": {c: {"recall": r, "support": 0 if r is None else 10} for c, r in recall.items()}},
        "subgroups": {
            f: {"groups": {g: {"n": n, "accuracy": a, "ranked": n >= 5 and g != "unknown"} for g, (a, n) in gs.items()}}
            for f, gs in fields.items()
        },
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
