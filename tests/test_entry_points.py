"""The thin entry points run as a user runs them: a fresh interpreter, from the folder the README says, with
relative paths, and the exit code and the files they promise checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
QUICK = ["--pretrained", "false", "--image_size", "32", "--epochs", "1", "--batch_size", "16", "--num_workers", "0"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def test_classification_scripts_train_evaluate_and_compare(tmp_path, small_d7p, fake_generation):
    """docs/classification.md: `cd classification; python classifier.py ...; python eval.py ...; python compare.py ...`."""
    work = tmp_path / "classification"
    work.mkdir()
    os.symlink(small_d7p, tmp_path / "captions")
    os.symlink(fake_generation, tmp_path / "synth")
    scripts = REPO / "classification"

    done = run([str(scripts / "classifier.py"), "--data_dir", "../captions", *QUICK], work)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "weights" / "best.safetensors").is_file() and (work / "weights" / "summary.json").is_file()

    done = run(
        [str(scripts / "eval.py"), "--checkpoint", "weights/best.safetensors", "--data_dir", "../captions"], work
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((work / "weights" / "eval-validation" / "metrics.json").read_text())
    assert metrics["split"] == "validation" and 0 <= metrics["overall"]["balanced_accuracy"] <= 1
    assert (work / "weights" / "eval-validation" / "confusion_matrix.png").is_file()

    args = [str(scripts / "compare.py"), "--data_dir", "../captions", "--synthetic_dir", "../synth", *QUICK]
    done = run([*args, "--runs", "real", "synthetic", "--output_dir", "cmp"], work)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((work / "cmp" / "comparison.json").read_text())
    assert [r["train"] for r in result["runs"]] == ["real", "synthetic"]
    assert pd.read_csv(work / "cmp" / "compare.csv")["train"].tolist() == ["real", "synthetic"]

    bad = run([str(scripts / "compare.py"), "--data_dir", "../captions", "--train", "mixed"], work)
    assert bad.returncode == 2 and "unrecognized arguments: --train" in bad.stderr


def test_top_level_scripts_build_captions_and_rename_metadata(tmp_path, ham_csv):
    """docs/captions.md, from the repository root with relative paths."""
    data = tmp_path / "data" / "ham10000"
    data.mkdir(parents=True)
    pd.read_csv(ham_csv).head(60).to_csv(data / "HAM10000_metadata.csv", index=False)
    done = run([str(REPO / "rename_metadata.py"), "--data_dir", "data", "--dataset", "ham10000"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (data / "metadata.csv").is_file() and not (data / "HAM10000_metadata.csv").exists()
    args = [str(REPO / "build_captions.py"), "--dataset", "ham10000", "--metadata", "data/ham10000/metadata.csv"]
    done = run([*args, "--out", "captions"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "captions" / "summary.json").read_text())["captioned"] == 60


@pytest.mark.parametrize(
    "script, flags, line",
    [
        ("train_lora.sh", ["--rank", "many"], "error: argument --rank: invalid int value: 'many'"),
        ("train_SD.sh", [], "error: --pretrained_model_name_or_path missing-model: model directory not found"),
    ],
)
def test_the_training_scripts_keep_a_runs_one_line_error_and_exit_code_2(script, flags, line, tmp_path):
    """accelerate launch reports a failed run with its own traceback and exit code 1; the scripts keep the run's."""
    env = {**ENV, "ACCELERATE": str(Path(sys.executable).with_name("accelerate"))}
    env |= {"ACCELERATE_CONFIG": str(REPO / "external" / "cpu.yaml"), "MODEL_NAME": "missing-model"}
    done = subprocess.run(
        ["bash", str(REPO / script), "--output_dir", str(tmp_path / "out"), *flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert line in done.stderr.strip().splitlines()[-1] and "Traceback" not in done.stderr
