"""Every command refuses, in one line and before writing anything, an output folder that would eat its input
(is it, holds it or lies inside it, symlinks resolved) or stand in another stage's output folder."""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from builders import write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def world(tmp_path: Path, monkeypatch) -> Path:
    """A captions folder, a generated set, a model and an image folder, as the stages leave them."""
    captions = tmp_path / "captions"
    (captions / "train").mkdir(parents=True)
    for name in ("captions.jsonl", "summary.json", "train/metadata.jsonl"):
        (captions / name).write_text("{}\n")
    write_manifest(tmp_path / "gen", [{"label": "mel"}, {"label": "nv"}])
    (tmp_path / "gen" / "generation_config.json").write_text("{}\n")
    (tmp_path / "model" / "vae").mkdir(parents=True)
    (tmp_path / "model" / "model_index.json").write_text("{}\n")
    (tmp_path / "model" / "vae" / "config.json").write_text("{}\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ISIC_0024306.jpg").write_bytes(b"jpeg")
    (tmp_path / "images_link").symlink_to(tmp_path / "images")
    (tmp_path / "ham.csv").write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


BUILD = ["lesiongen.captions.build", "--dataset", "ham10000", "--metadata", "ham.csv", "--images", "images"]
TRAIN = ["lesiongen.diffusion.train", "--pretrained_model_name_or_path", "model", "--train_data_dir"]
VAE = ["lesiongen.diffusion.train_vae", "--pretrained_model_name_or_path", "model", "--train_data_dir", "images"]
GENERATE = ["lesiongen.diffusion.generate", "--model_path", "model", "--num_images", "1"]
EVALUATE = ["lesiongen.evaluate.run", "--real", "captions", "--synthetic", "gen/manifest.csv"]

CASES = {
    # a rebuild's links would point at themselves, copies would replace the images they copy
    "captions inside their images": ([*BUILD, "--out", "images/captions"], "lies inside --images images"),
    "captions inside their images, through a link": (
        [*BUILD, "--out", "images_link/captions"],
        "lies inside --images images",
    ),
    "captions around their metadata": ([*BUILD, "--out", "."], "contains --metadata ham.csv"),
    "a model inside its training data": ([*TRAIN, "captions/train", "--output_dir", "captions/train/lora"], "lies"),
    "a model over its base": ([*TRAIN, "captions/train", "--output_dir", "model"], "is --pretrained_model_name"),
    "a VAE inside its training images": ([*VAE, "--output_dir", "images/vae"], "lies inside --train_data_dir"),
    # generated splits would replace the real ones a classifier then trains on
    "images into a captions folder": ([*GENERATE, "--output_dir", "captions"], "holds the output of build_captions.py"),
    "images into a model": ([*GENERATE, "--output_dir", "model"], "is --model_path model"),
    "an export inside its set": (
        ["lesiongen.diffusion.export", "--input_dir", "gen", "--output_dir", "gen/hf"],
        "lies",
    ),
    "an export over another set": (
        ["lesiongen.diffusion.export", "--input_dir", "gen", "--output_dir", "captions"],
        "holds the output of build_captions.py",
    ),
    # its summary.json would replace the captions' own
    "a classifier into its data": (
        ["lesiongen.classify.train", "--data_dir", "captions", "--output_dir", "captions"],
        "is",
    ),
    "a classifier into its synthetic set": (
        [
            "lesiongen.classify.train",
            "--data_dir",
            "captions",
            "--synthetic_dir",
            "gen/manifest.csv",
            "--output_dir",
            "gen",
        ],
        "is --synthetic_dir gen",
    ),
    "a comparison inside its data": (
        ["lesiongen.classify.compare", "--data_dir", "captions", "--runs", "real", "--output_dir", "captions/cmp"],
        "lies inside --data_dir captions",
    ),
    "an evaluation inside the generated set": ([*EVALUATE, "--output_dir", "gen/eval"], "lies inside --synthetic gen"),
    "an evaluation into a classifier's data": ([*EVALUATE, "--output_dir", "captions"], "is --real captions"),
    "a filter's models inside the set it marks": (
        ["lesiongen.evaluate.filter", "--synthetic", "gen", "--data_dir", "captions", "--output_dir", "gen/filter"],
        "lies inside --synthetic gen",
    ),
    "an analysis inside its images": (
        ["lesiongen.captions.analyze", "--images", "images", "--output_dir", "images/measured"],
        "lies inside --images images",
    ),
    "a latent cache inside its training data": (
        ["lesiongen.diffusion.cache_latents", *TRAIN[1:], "captions/train", "--output_dir", "captions/train/out"],
        "lies inside --train_data_dir captions/train",
    ),
    "the paper experiment inside its data": (
        ["experiments/paper_experiment.py", "--data", "images", "--output_dir", "images/paper"],
        "lies inside --data images",
    ),
}


def command(name: str):
    """A stage module, or the paper experiment's script (not a package), by file."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location("paper_experiment", REPO / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", CASES)
def test_an_output_folder_that_would_eat_an_input_or_another_stage_is_one_line(world, case, capsys):
    module, *argv = CASES[case][0]
    before = {p: p.read_bytes() for p in world.rglob("*") if p.is_file()}
    assert command(module).main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and CASES[case][1] in err[0], err
    assert {p: p.read_bytes() for p in world.rglob("*") if p.is_file()} == before  # nothing written, nothing lost


HELD = {
    "build_captions": ["lesiongen.captions.build", "--dataset", "ham10000", "--metadata", "ham.csv"],
    "analyze": ["lesiongen.captions.analyze", "--images", "images"],
    "train": [*TRAIN, "captions/train"],
    "cache_latents": ["lesiongen.diffusion.cache_latents", *TRAIN[1:], "captions/train"],
    "generate": GENERATE,
    "export": ["lesiongen.diffusion.export", "--input_dir", "gen"],
    "classifier": ["lesiongen.classify.train", "--data_dir", "captions"],
    "compare": ["lesiongen.classify.compare", "--data_dir", "captions", "--runs", "real"],
    "evaluate": EVALUATE,
    "demo": ["lesiongen.demo.run"],
    "paper experiment": ["experiments/paper_experiment.py", "--data", "images"],
}
HOLD = """
import sys, time
from contextlib import ExitStack
from lesiongen.files import output_lock
with ExitStack() as stack:
    for folder in sys.argv[1:]:
        stack.enter_context(output_lock(folder))
    print("held", flush=True)
    time.sleep(300)
"""


def test_every_command_stops_at_a_folder_another_run_holds(world, capsys):
    """Two runs into one folder both reported success and one result silently replaced the other (issue 32)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, "held", "model/vae"], cwd=world, stdout=subprocess.PIPE, text=True, env=env
    )
    busy = f"another run is writing here (pid {holder.pid} on {socket.gethostname()}); wait for it to finish"
    try:
        assert holder.stdout.readline() == "held\n"
        for name, (module, *argv) in HELD.items():
            assert command(module).main([*argv, "--output_dir", "held"]) == 2, name
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"error: --output_dir held: {busy}, or choose another folder"], name
        assert command(VAE[0]).main(VAE[1:]) == 2  # its default output: the pipeline's vae/, replaced
        assert capsys.readouterr().err.startswith(f"error: --output_dir model/vae: {busy}")
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in (world / "held").iterdir()] == [".lesiongen.lock"]  # nothing written by any of them
