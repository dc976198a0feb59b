"""Image files: the one list of suffixes, the one opener, the one decode check and the one grid.

Every stage reads images through here, so a file one stage accepts is accepted by all, and a corrupt,
truncated or oversized file fails the same way everywhere: as a reason string the caller counts or
turns into one line, never as a traceback from inside a DataLoader.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# What PIL raises for a file it cannot decode; DecompressionBombError (more than twice PIL's pixel
# limit, a crafted or absurdly large file) is not an OSError, so it is named here.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
LABEL_HEIGHT = 14  # px above each labelled grid row


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, so every run sees them in the same order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_rgb(path: str | Path, draft: int | None = None) -> Image.Image:
    """Decode a file as RGB (greyscale and palette files become three channels).

    ``draft`` lets JPEG decode at a reduced scale that is still at least that many pixels a side: the
    stages train at 32-256 px, and a full-size decode of a 6000 px photograph would be wasted work.
    """
    with Image.open(path) as im:
        if draft:
            im.draft("RGB", (draft, draft))
        return im.convert("RGB")


def square(image: Image.Image, size: int | None) -> Image.Image:
    """Centre square crop, then resize to ``size`` (antialiased): the generator's own training framing."""
    if size is None:
        return image
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.BILINEAR)


def read_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """uint8 RGB pixels (H, W, 3); with ``size``, centre-cropped and resized to size x size."""
    return np.asarray(square(open_rgb(path), size))


def decode_problem(path: str | Path) -> str | None:
    """Why a file does not decode completely, or None. Reads every byte (a header check would pass a
    truncated JPEG that then fails mid-training), at a reduced JPEG scale so large sets check quickly."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except UNREADABLE as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None


def image_grid(
    cells: Sequence[Image.Image | None],
    cols: int,
    tile: int | None = None,
    row_labels: Sequence[str] | None = None,
    fill: tuple[int, int, int] = (200, 200, 200),
) -> Image.Image:
    """Tiles in rows of ``cols`` (diffusers' ``make_image_grid``); ``None`` cells and the last row's gap are
    ``fill``. With ``row_labels`` each row gets a white strip with its label above it."""
    from diffusers.utils import make_image_grid

    present = [c for c in cells if c is not None]
    if not present and tile is None:
        raise ValueError("image_grid needs at least one image or a tile size")
    side, height = (tile, tile) if tile else present[0].size
    blank = Image.new("RGB", (side, height), fill)
    tiles = [blank if c is None else c.convert("RGB") for c in cells]
    tiles += [blank] * (-len(tiles) % cols)
    rows = len(tiles) // cols
    grid = make_image_grid(tiles, rows=rows, cols=cols, resize=tile)
    if not row_labels:
        return grid
    out = Image.new("RGB", (grid.width, grid.height + rows * LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    for r in range(rows):
        top = r * (height + LABEL_HEIGHT)
        draw.text((2, top + 1), row_labels[r] if r < len(row_labels) else "", fill="black")
        out.paste(grid.crop((0, r * height, grid.width, (r + 1) * height)), (0, top + LABEL_HEIGHT))
    return out
