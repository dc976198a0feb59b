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


# Stands in for diffusers' train_text_to_image_lora.py, which is not part of LesionGen: the check only reads
# the reference's per-step progress bar ("Steps"), one update per optimiser step, and passes it these flags.
STAND_IN_REFERENCE = """
import argparse, time
from tqdm.auto import tqdm
p = argparse.ArgumentParser()
p.add_argument("--max_train_steps", type=int, required=True)
p.add_argument("--train_data_dir", required=True)
p.add_argument("--caption_column", required=True)
args, _ = p.parse_known_args()
bar = tqdm(range(args.max_train_steps), desc="Steps")
for _ in range(args.max_train_steps):
    time.sleep(0.5)
    bar.update(1)
"""


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_prints_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WHEELS": str(tmp_path / "no-wheels")}
    (tmp_path / "reference.py").write_text(STAND_IN_REFERENCE)
    args = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--images", "8"]
    args += ["--reference", str(tmp_path / "reference.py")]
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

    # the speed goals' ratios, from bench_train.py and bench_generate.py on the same model
    figures = json.loads((tmp_path / "figures.json").read_text())
    training = figures["training_ratio"]
    assert training["reference"]["steps_per_s"]["median"] == pytest.approx(2.0, rel=0.2)  # 0.5 s a step
    for name in ("sd1 uncached", "sd1 cached"):
        wall = training[name]["steps_per_s"]
        assert wall["ratio"] == pytest.approx(wall["median"] / training["reference"]["steps_per_s"]["median"])
        assert f"training, LesionGen {name}: {wall['ratio']:.2f}x diffusers' script" in proc.stdout
    generation = figures["generation_ratio"]["images_per_s_and_per_cpu_s"]
    assert list(generation)[1:] == ["generate() batch 16"]
    assert all(wall > 0 and cpu > 0 for wall, cpu in generation.values())
    assert "generation, generate() batch 16: " in proc.stdout


def test_gpu_check_refuses_a_reference_script_that_is_not_there(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--reference", str(tmp_path / "missing.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"--reference: no file {tmp_path / 'missing.py'}" in proc.stderr
    assert "train_text_to_image_lora.py" in proc.stderr.splitlines()[-1]
