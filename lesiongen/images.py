"""Image files: the one list of suffixes, the one opener, the one decode check and the one grid.

Every stage reads images through here, so a file one stage accepts is accepted by all, and a corrupt,
truncated or oversized file fails the same way everywhere: as ``UnreadableImage``, an ``InputError``
naming the file, which a caller that may skip counts (``decode_problem``) and any other caller lets
through to ``cli.run`` as one line, never as a traceback from inside a DataLoader.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# What PIL raises for a file it cannot decode (DecompressionBombError is not an OSError).
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# PIL's decompression-bomb limit (89.5 M pixels, about 270 MB as RGB). PIL only warns up to twice that;
# here the limit itself refuses, since a dermoscopic image has under 40 M pixels (HAM10000: 0.27 M).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
LABEL_HEIGHT = 14  # px above each labelled grid row
BACKGROUND = (255, 255, 255)  # what transparent pixels show, as an image viewer shows them


class UnreadableImage(InputError):
    """A file that does not decode as an image; ``reason`` is PIL's account of why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(path, f"cannot read image ({reason})", "replace the file, or remove it or its row")
        self.reason = reason

    @classmethod
    def from_error(cls, path: str | Path, error: Exception) -> UnreadableImage:
        return cls(path, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, so every run sees them in the same order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _opened(path: str | Path) -> Image.Image:
    """``Image.open`` (header only) that refuses more than ``MAX_PIXELS`` before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, naming the size
        im = Image.open(path)
    if im.width * im.height > MAX_PIXELS:
        im.close()
        raise Image.DecompressionBombError(
            f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds the limit of {MAX_PIXELS}"
        )
    return im


def _eight_bit(im: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits scaled to 8: PIL's ``convert("RGB")`` clips such pixels to 0-255, so a
    16-bit image turned near-white and a 0-1 float image black, and both trained silently.

    16-bit data (``I;16*``, and a 16-bit PNG that an older Pillow opens as ``I``) keeps its high byte;
    floats are taken as 0-1 or 0-255 by their range; any other 32-bit data has no known depth and is refused.
    """
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        pixels = np.asarray(im).astype(np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"{im.mode} pixels outside 0-65535")
        return Image.fromarray((pixels >> 8).astype(np.uint8))
    if im.mode == "I":
        raise ValueError("32-bit integer pixels of unknown bit depth; save it as an 8- or 16-bit PNG")
    if im.mode == "F":
        pixels = np.asarray(im, dtype=np.float64)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
            raise ValueError("float pixels that are not finite values in 0-1 or 0-255")
        scale = 255.0 if pixels.max() <= 1.0 else 1.0
        return Image.fromarray(np.round(pixels * scale).astype(np.uint8))
    return im


def open_rgb(path: str | Path, draft: int | None = None) -> Image.Image:
    """Decode a file as RGB (greyscale and palette files become three channels, transparency shows white).

    ``draft`` lets JPEG decode at a reduced scale that is still at least that many pixels a side: the
    stages train at 32-256 px, and a full-size decode of a 6000 px photograph would be wasted work.
    Transparent pixels keep whatever colour the writer left under them, so they are composited over
    ``BACKGROUND`` rather than shown as that hidden colour.
    """
    try:
        with _opened(path) as im:
            if draft:
                im.draft("RGB", (draft, draft))
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                return _eight_bit(im).convert("RGB")
            if not im.has_transparency_data:
                return im.convert("RGB")
            rgba = im.convert("RGBA")
            out = Image.new("RGB", rgba.size, BACKGROUND)
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
    except PIL_ERRORS as e:
        raise UnreadableImage.from_error(path, e) from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a file from its header, before any decode or draft."""
    try:
        with _opened(path) as im:
            return im.size
    except PIL_ERRORS as e:
        raise UnreadableImage.from_error(path, e) from None


def read_alpha(path: str | Path) -> np.ndarray | None:
    """The alpha channel (uint8, H x W) of a file with transparency, else None: what a measurement must ignore."""
    try:
        with _opened(path) as im:
            return np.asarray(im.convert("RGBA").getchannel("A")) if im.has_transparency_data else None
    except PIL_ERRORS as e:
        raise UnreadableImage.from_error(path, e) from None


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
    """Why a file does not decode completely, or None. Decodes every byte (a header check would pass a
    truncated JPEG that then fails mid-training), at a reduced JPEG scale so large sets check quickly."""
    try:
        open_rgb(path, draft=64)
    except UnreadableImage as e:
        return e.reason
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
