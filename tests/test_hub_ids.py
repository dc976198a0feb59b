"""No file of the repository names a Hub repository that no longer exists, so every documented command can run."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Removed from the Hub in 2024; its maintained copy is stable-diffusion-v1-5/stable-diffusion-v1-5. Built from
# parts so that this file does not name it.
REMOVED_IDS = ("/".join(("runwayml", "stable-diffusion-v1-5")),)


def repository_files() -> list[Path]:
    """Tracked files and new ones git does not ignore (outputs such as demo_output/ are ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    return [REPO / name for name in listed.decode().split("\0") if name and (REPO / name).is_file()]


def test_no_file_names_a_removed_hub_repository():
    files = repository_files()
    assert any(f.name == "train_lora.sh" for f in files)
    found = [
        f"{f.relative_to(REPO)}: {removed}"
        for f in files
        for removed in REMOVED_IDS
        if removed.encode() in f.read_bytes()
    ]
    assert found == []


def test_the_sd1_default_is_the_maintained_copy():
    from lesiongen.diffusion.config import TrainConfig

    maintained = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert TrainConfig.__dataclass_fields__["pretrained_model_name_or_path"].default == maintained
    for script in ("train_lora.sh", "train_SD.sh"):
        assert f'MODEL_NAME="${{MODEL_NAME:-{maintained}}}"' in (REPO / script).read_text()
