"""The one image opener: corrupt, truncated, oversized and transparent files behave the same in every stage."""

from __future__ import annotations

import numpy as np
import pytest
from builders import oversized_png, truncated_jpeg
from PIL import Image

from lesiongen.errors import InputError
from lesiongen.images import UnreadableImage, decode_problem, open_rgb, read_rgb


@pytest.mark.parametrize("side", [9500, 13400], ids=["past-the-limit", "past-twice-the-limit"])
def test_oversized_image_is_refused_before_decoding(tmp_path, side):
    # 9500 px: PIL only warns and would decode 90 M pixels (270 MB as RGB); 13400 px: PIL raises
    path = oversized_png(tmp_path / "huge.png", side)
    assert path.stat().st_size < 100_000
    assert "exceeds" in decode_problem(path)
    with pytest.raises(UnreadableImage, match="huge.png: cannot read image .*exceeds"):
        open_rgb(path)


def test_truncated_jpeg_fails_the_decode_check(tmp_path, d7p_images):
    path = truncated_jpeg(next(d7p_images.rglob("*.jpg")), tmp_path / "cut.jpg")
    with Image.open(path) as im:
        im.verify()  # the header check passes: only a full decode finds the damage
    assert "truncated" in decode_problem(path)


def test_unreadable_image_names_the_file_even_where_no_caller_counts_it(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(InputError, match=r"notes.png: cannot read image \(UnidentifiedImageError"):
        read_rgb(path)


def test_transparent_pixels_are_white_not_their_hidden_colour(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # a red hidden under alpha 0
    rgba[:4, :, 3] = 255  # the top half is opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    pixels = read_rgb(tmp_path / "half.png")
    assert (pixels[:4] == (200, 0, 0)).all() and (pixels[4:] == 255).all()


def test_images_of_other_bit_depths_decode_to_their_true_8_bit_values(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # opens as I;16, which convert("RGB") clips to white
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "float01.tiff")
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(tmp_path / "float255.tiff")
    grey = read_rgb(tmp_path / "grey16.png")
    assert grey.dtype == np.uint8 and grey.shape == (8, 8, 3)
    assert np.array_equal(grey[..., 0], (ramp >> 8).astype(np.uint8)) and (grey[..., 0] == grey[..., 2]).all()
    assert (read_rgb(tmp_path / "float01.tiff") == 128).all()
    assert (read_rgb(tmp_path / "float255.tiff") == 200).all()


@pytest.mark.parametrize(
    "pixels, why",
    [
        (np.full((8, 8), 70000, np.int32), "unknown bit depth"),
        (np.full((8, 8), np.nan, np.float32), "not finite"),
        (np.full((8, 8), 1000.0, np.float32), "0-255"),
    ],
)
def test_pixels_of_no_known_depth_are_refused_naming_the_file(tmp_path, pixels, why):
    path = tmp_path / "odd.tiff"
    Image.fromarray(pixels).save(path)
    with pytest.raises(UnreadableImage, match=why) as e:
        read_rgb(path)
    assert str(path) in str(e.value)
    assert why in decode_problem(path)
