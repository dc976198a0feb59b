"""The README stays a short guide whose links work; the measurements live in docs/results.md, newest first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_short_guide():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for command in ("make demo", "make test", "stable-diffusion-v1-5/stable-diffusion-v1-5", "hf auth login"):
        assert command in text
    assert "HF_TOKEN" in text and "CC BY-NC 4.0" in text and "derm.cs.sfu.ca" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path) if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and fragment not in {anchor(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}:
            broken.append(f"{target}: no such heading")
    assert broken == []


def test_the_readme_shows_its_figures():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (REPO / "README.md").read_text())
    assert len(images) >= 2 and all((REPO / image).stat().st_size < 400_000 for image in images)


def test_results_are_dated_newest_first():
    dates = re.findall(r"^## (\d{4}-\d{2}-\d{2})", (REPO / "docs" / "results.md").read_text(), re.M)
    assert len(dates) >= 10 and dates == sorted(dates, reverse=True)
