"""Export speed of a generated set to parquet, and how fast datasets loads and streams it back.

A generate.py-shaped folder of ``--images`` 64 px PNGs with a manifest is made once under ``--work``;
then ``python -m lesiongen.diffusion.export`` runs in a fresh child, and the result is read back with
``datasets.load_dataset`` whole (decoding every image) and with ``streaming=True``.

    python benchmarks/bench_export.py --images 10000
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_generation(folder: Path, n: int) -> Path:
    """PNGs under dataset/<Condition>/ and a manifest.csv with generate.py's columns; reused when complete."""
    from PIL import Image

    from lesiongen import labels
    from lesiongen.diffusion.manifest import MANIFEST_COLUMNS

    manifest = folder / "manifest.csv"
    if manifest.is_file() and sum(1 for _ in manifest.open()) == n + 1:
        return folder
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        c = labels.CONDITIONS[i % len(labels.CONDITIONS)]
        name = f"dataset/{c.name}/{c.code}_{i:06d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(rng.normal(150, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name)
        row = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(file_name=name, text=f"{c.phrase}, dermoscopic image", label=c.code, condition=c.name, dx=c.code)
        row.update(sex="female", age=50, age_bin="45-59", site="back", site_group="trunk", skin_tone="unknown")
        row.update(seed=i, guidance_scale=7.5, num_inference_steps=25, scheduler="dpmsolver++", model="tiny", index=i)
        rows.append(row)
    with manifest.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--rows_per_shard", type=int, default=1000)
    p.add_argument("--work", default="/tmp/lesiongen-bench-export")
    args = p.parse_args(argv)
    import datasets

    work = Path(args.work)
    source = make_generation(work / "generated", args.images)
    out = work / "exported"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lesiongen.diffusion.export", "--input_dir", str(source), "--output_dir", str(out)]
    cmd += ["--rows_per_shard", str(args.rows_per_shard)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    export_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (out / "data").iterdir()) / 2**20

    start = time.perf_counter()
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(work / "hf-cache"))
    for row in ds:
        row["image"].load()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    streamed = sum(1 for row in datasets.load_dataset(str(out), split="train", streaming=True) if row["image"].size)
    stream_s = time.perf_counter() - start
    assert len(ds) == streamed == args.images

    print(
        f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} cores, datasets {datasets.__version__}"
    )
    print(f"{args.images} 64 px PNGs, {args.rows_per_shard} rows per shard, {size:.0f} MiB of parquet")
    print(f"  export (fresh process, one): {export_s:.1f} s, {args.images / export_s:.0f} images/s")
    print(f"  load_dataset and decode every image: {load_s:.1f} s, {args.images / load_s:.0f} images/s")
    print(f"  load_dataset(streaming=True), every image: {stream_s:.1f} s, {args.images / stream_s:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
