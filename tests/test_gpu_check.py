"""benchmarks/gpu_check.sh cannot run here (no GPU), so its every Python part runs as a CPU dry run at tiny size:
the same script, the same training, generation and FLOP-counting code, with the figures it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_prints_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WHEELS": str(tmp_path / "no-wheels")}
    args = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--images", "8"]
    args += ["--gen_images", "4", "--gen_steps", "2", "--workers", "0", "--json", str(tmp_path / "figures.json")]
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no wheel folder" in proc.stdout
    rows = json.loads((tmp_path / "figures.json").read_text())["rows"]
    runs = [r["run"] for r in rows]
    assert runs[0] == "LoRA cached, 1 x 4" and runs[2] == "LoRA uncached, 1 x 4"
    assert runs[1].startswith("LoRA cached, auto ") and runs[3].startswith("LoRA uncached, auto ")
    assert [r.split(",")[1] for r in runs[4:]] == [" batch 1", " batch 16"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["memory_gib"] > 0 and r["tflops"] > 0, r
    assert all(r["steps_per_s"] > 0 for r in rows[:4])
    for line in ("automatic micro-batch, cached:", "automatic micro-batch, uncached:", "images/s, peak RSS"):
        assert line in proc.stdout, line
