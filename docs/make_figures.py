"""The README's two figures, from a finished demo run: real against generated images per condition, and
steering pairs that differ in one switch only.

    python -m lesiongen.demo --output_dir demo_output
    python docs/make_figures.py --demo_output demo_output        # writes docs/figures/*.png

Each figure is the demo's own images at their 64 px, in the order the demo report picks them (file order), so a
rerun of the same demo gives the same figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesiongen import labels
from lesiongen.cli import run
from lesiongen.demo.report import pick_paths
from lesiongen.errors import InputError
from lesiongen.evaluate.faithfulness import pairs
from lesiongen.files import atomic_path
from lesiongen.images import image_grid, open_rgb
from lesiongen.tables import read_image_table

FIGURES = Path(__file__).resolve().parent / "figures"
WHITE = (255, 255, 255)
# The two switches the README shows: on the default seed both move their image (docs/results.md), where the skin
# tone barely does.
SWITCHES = ("blue_whitish_veil", "pigmentation")


def conditions_figure(demo: Path, per_side: int, tile: int):
    """One row per condition: ``per_side`` real images, a white gap, ``per_side`` generated images."""
    real = read_image_table(demo / "captions")
    generated = read_image_table(demo / "generated")
    cells, row_labels = [], []
    for cond in labels.CONDITIONS:
        real_paths = pick_paths(real, cond.code, per_side)
        generated_paths = pick_paths(generated, cond.code, per_side)
        cells += [open_rgb(p) for p in real_paths] + [None] * (per_side - len(real_paths)) + [None]
        cells += [open_rgb(p) for p in generated_paths] + [None] * (per_side - len(generated_paths))
        row_labels.append(f"{cond.name}: real (left), generated (right)")
    return image_grid(cells, cols=2 * per_side + 1, tile=tile, row_labels=row_labels, fill=WHITE)


def steering_figure(demo: Path, tile: int):
    """For each switch, one pair per condition: the switch on in the first row, off in the second."""
    frame = read_image_table(demo / "pairs")
    table = pairs(frame)
    cells, row_labels = [], []
    for switch in SWITCHES:
        group = table[table["field"] == switch]
        if group.empty:
            raise InputError(
                demo / "pairs", f"holds no '{switch}' pairs", "run the full demo: python -m lesiongen.demo"
            )
        chosen = group.groupby(group["on"].map(frame["label"]), sort=False).head(1)
        contrast = chosen["contrast"].iloc[0]
        _, _, values = contrast.partition("=")
        on, _, off = values.partition(":")
        for side, value in (("on", on or "present"), ("off", off or "absent")):
            cells += [open_rgb(frame.at[i, "path"]) for i in chosen[side]]
            row_labels.append(f"{switch.replace('_', ' ')}: {value}")
    return image_grid(cells, cols=len(chosen), tile=tile, row_labels=row_labels, fill=WHITE)


def save(image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


def make_figures(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_output", default="demo_output", help="a finished python -m lesiongen.demo folder")
    parser.add_argument("--per_side", type=int, default=4, help="real and generated images per condition")
    parser.add_argument("--tile", type=int, default=64, help="tile size in pixels (the demo's images are 64 px)")
    args = parser.parse_args(argv)
    demo = Path(args.demo_output)
    for name, image in (
        ("conditions.png", conditions_figure(demo, args.per_side, args.tile)),
        ("steering.png", steering_figure(demo, args.tile)),
    ):
        print(f"wrote {save(image, FIGURES / name)} ({image.width}x{image.height})")


def main(argv: list[str] | None = None) -> int:
    return run(lambda: make_figures(argv))


if __name__ == "__main__":
    sys.exit(main())
