"""Session-wide fixtures: the real data in ../shared/data and expensive artefacts built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
    from lesiongen.tiny import build_tiny_pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd") / "tiny-sd", resolution=64, seed=0)
