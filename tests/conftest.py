"""Session-wide fixtures: the real data in ../shared/data and expensive artefacts built once per run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The tests never reach the network. Set before anything imports huggingface_hub or datasets, which read it once
# at import: set later (in a fixture or by monkeypatch), a Hub lookup still went out and waited 20 s on its retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run fastest on one thread; two threads on two shared cores were measured 10-30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# What `pip install .` builds from besides the package: its metadata and the files pyproject.toml reads.
PACKAGE_FILES = ("pyproject.toml", "requirements.txt", "requirements-dev.txt", "README.md", "LICENSE")


@pytest.fixture(scope="session")
def installed_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding LesionGen's wheel, its console scripts and nothing from this checkout.

    The wheel is built from a copy of the package sources and installed with ``--no-deps``; the dependencies come
    from this interpreter's site-packages through a ``.pth`` line (no download here), and test_install.py checks
    that the wheel's declared requirements name every module the package imports, so the loan hides nothing.
    """
    root = tmp_path_factory.mktemp("install")
    shutil.copytree(REPO / "lesiongen", root / "src" / "lesiongen", ignore=shutil.ignore_patterns("__pycache__"))
    for name in PACKAGE_FILES:
        shutil.copy2(REPO / name, root / "src" / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "wheels", root / "src"], check=True
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    wheel = next((root / "wheels").glob("lesiongen-*.whl"))
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    )
    shared = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (Path(site.stdout.strip()) / "lesiongen_test_dependencies.pth").write_text("\n".join(shared) + "\n")
    return venv


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real data (HAM10000 metadata, Derm7pt, PH2); fails loudly when absent."""
    root = Path(os.environ.get("LESIONGEN_DATA", REPO.parent / "shared" / "data"))
    if not (root / "d7p" / "meta" / "meta.csv").is_file():
        pytest.fail(f"real test data not found at {root}; set LESIONGEN_DATA to the shared data folder")
    return root


@pytest.fixture(scope="session")
def ham_csv(data_root: Path) -> Path:
    return data_root / "ham10000" / "HAM10000_metadata.csv"


@pytest.fixture(scope="session")
def d7p_csv(data_root: Path) -> Path:
    return data_root / "d7p" / "meta" / "meta.csv"


@pytest.fixture(scope="session")
def d7p_images(data_root: Path) -> Path:
    return data_root / "d7p" / "images"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """The embedded tiny SD-architecture model (64 px, random weights), built once and loaded via from_pretrained."""
    import torch

    from lesiongen.diffusion.tiny import build_tiny_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # measured 1.5 s on one thread vs 11 s on two busy cores
    try:
        return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "tiny-sd", resolution=64, seed=0)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def d7p_captions_dir(tmp_path_factory, d7p_csv: Path, d7p_images: Path) -> Path:
    """build_captions on a real Derm7pt subset: up to 3 imaged cases per diagnosis (about 55), concept captions.

    A subset keeps the session cheap; its splits are lesion-grouped (the official index files cover all rows).
    """
    import pandas as pd

    from lesiongen.captions.build import main as build_captions

    root = tmp_path_factory.mktemp("d7p_captions")
    meta = pd.read_csv(d7p_csv)
    imaged = meta[[(d7p_images / str(p)).is_file() for p in meta["derm"]]]
    imaged.groupby("diagnosis", sort=False).head(3).to_csv(root / "meta_subset.csv", index=False)
    out = root / "captions"
    args = ["--dataset", "d7p", "--metadata", str(root / "meta_subset.csv"), "--images", str(d7p_images)]
    args += ["--out", str(out), "--skip_bad_rows"]
    assert build_captions(args) == 0
    return out


@pytest.fixture(scope="session")
def d7p_small_train(tmp_path_factory, d7p_captions_dir: Path) -> Path:
    """A 10-image imagefolder (2 per label) cut from the Derm7pt train split, for quick training runs."""
    import json

    rows = [json.loads(line) for line in (d7p_captions_dir / "train" / "metadata.jsonl").read_text().splitlines()]
    out = tmp_path_factory.mktemp("d7p_small") / "train"
    (out / "images").mkdir(parents=True)
    picked: dict[str, int] = {}
    lines = []
    for row in rows:
        if picked.get(row["label"], 0) < 2:
            picked[row["label"]] = picked.get(row["label"], 0) + 1
            name = f"images/{row['image_id']}.jpg"
            os.symlink((d7p_captions_dir / "train" / row["file_name"]).resolve(), out / name)
            lines.append(json.dumps({**row, "file_name": name}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory, tiny_sd_dir: Path, d7p_small_train: Path) -> Path:
    """A LoRA (rank 4, alpha 8) trained 6 steps on d7p_small_train with checkpoints at 3 and 6; its output dir."""
    import torch

    from lesiongen.diffusion.train import TrainConfig, train

    out = tmp_path_factory.mktemp("lora_run") / "lora"
    cfg = TrainConfig(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        train_data_dir=str(d7p_small_train),
        output_dir=str(out),
        resolution=64,
        rank=4,
        lora_alpha=8,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        max_train_steps=6,
        learning_rate=1e-3,
        checkpointing_steps=3,
        validation_steps=6,
        validation_inference_steps=2,
        caption_dropout=0.1,
        snr_gamma=5.0,
        seed=0,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and far faster when other tests share the cores
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def d7p_built(tmp_path_factory, d7p_csv: Path, d7p_images: Path) -> Path:
    """All 616 imaged Derm7pt cases with the official train/validation split (metadata reports: seconds)."""
    from builders import build_d7p

    return build_d7p(tmp_path_factory.mktemp("d7p") / "built", d7p_csv, d7p_images)


@pytest.fixture(scope="session")
def small_d7p(tmp_path_factory, d7p_built: Path) -> Path:
    """Up to 6 train and 3 validation images per class (about 35 + 19) from the real Derm7pt build."""
    from builders import subset

    return subset(d7p_built, tmp_path_factory.mktemp("cls") / "small", {"train": 6, "validation": 3})


@pytest.fixture(scope="session")
def fake_generation(tmp_path_factory, small_d7p: Path) -> Path:
    """A generate.py-shaped folder whose 'synthetic' images are shrunk real ones, so they carry signal."""
    import numpy as np
    from builders import write_manifest
    from PIL import Image

    from lesiongen.tables import read_image_table

    frame = read_image_table(small_d7p, "train")
    rows = [
        {"label": r.label, "pixels": np.asarray(Image.open(r.path).convert("RGB").resize((40, 40)))}
        for r in frame.itertuples()
    ]
    return write_manifest(tmp_path_factory.mktemp("gen") / "gen", rows)


def family_params():
    from lesiongen.diffusion.families import FAMILIES

    return sorted(FAMILIES)


@pytest.fixture(scope="session", params=family_params())
def family_name(request) -> str:
    """Every registered model family: a test taking this runs once per family, the day a family is added."""
    return request.param


@pytest.fixture(scope="session")
def tiny_family_dir(request, family_name: str, tmp_path_factory) -> Path:
    """The family's tiny build (64 px), saved as a complete pipeline; sd1's is ``tiny_sd_dir`` itself."""
    import torch

    from lesiongen.diffusion.tiny import build_tiny_pipeline

    if family_name == "sd1":
        return request.getfixturevalue("tiny_sd_dir")
    torch.set_num_threads(1)
    return build_tiny_pipeline(tmp_path_factory.mktemp(f"tiny_{family_name}") / family_name, family=family_name)
