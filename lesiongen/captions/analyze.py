"""Image -> field of view, hair removal, lesion mask, measured descriptors and ITA skin tone.

Classical and offline (numpy, scipy, scikit-image, PIL; no torch), so any folder of real or generated
dermoscopic images can be described without a trained model. Every image is analysed at one working
size (longer side ``WORK_SIZE``) and its mask is returned at the input's size. An image that cannot be
measured (grayscale, tiny, black, no lesion, lesion filling the frame) gets ``mask_ok: False`` and no
measured claims, never an exception or a made-up value.

Run on a folder: ``python -m lesiongen.captions.analyze --images DIR --output_dir DIR``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import color, filters, morphology

from .. import labels
from ..cli import option, run_stage
from ..errors import InputError
from ..files import atomic_path, write_json, write_jsonl
from ..images import IMAGE_SUFFIXES, UnreadableImage, image_grid, list_images, read_alpha, read_rgb

# The keys of report["measured"] (issue 9), in this order in measured.jsonl.
MEASURED_KEYS: tuple[str, ...] = (
    "area_pct",
    "cut_off",
    "colors",
    "color_variability",
    "color_asymmetry",
    "shape_asymmetry",
    "blue_gray_pct",
    "red_pct",
    "hair_pct",
    "ita",
    "skin_tone",
    "mask_ok",
)
COLOR_NAMES: tuple[str, ...] = ("light_brown", "dark_brown", "black", "blue_gray", "red", "white")

WORK_SIZE = 256  # longer side of the working image: ~0.05-0.1 s per image on one core
MIN_SIDE = 32  # smaller inputs carry too few pixels for a mask
# Neighbouring pixels of any photograph correlate (>= 0.46 over Derm7pt, PH2 and the demo images; median
# 0.97); white noise, e.g. an untrained generator's output, does not and would yield blob "lesions".
NOISE_MAX_CORR, NOISE_MIN_STD = 0.3, 8.0
FOV_DARK = 0.16  # max-channel value below which a border-connected region is the dermoscope's black frame
MIN_FOV_FRACTION = 0.25  # less visible skin than this: a black or nearly black frame
HAIR_RADIUS = 5  # black-hat disk at the working size; hairs are 2-6 px wide there
HAIR_CONTRAST = 0.06  # black-hat response (0-1 luminance) that counts as hair or ruler ink
MIN_LESION_FRACTION = 0.004  # of the field of view: smaller is "no lesion found"
MAX_LESION_FRACTION = 0.92  # of the field of view: larger means no skin left to contrast with
MIN_CONTRAST = 0.05  # inverted-blue difference lesion vs skin; below it the threshold split noise
MIN_DELTA_E = 10.0  # fallback segmentation: lesion-to-skin colour distance (CIELAB) needed to call it a lesion
SKIN_BAND = 0.12  # fallback: skin colour is the median of this outer band of the field of view (shorter side)
RING_GAP, RING_WIDTH = 0.04, 0.10  # healthy-skin ring around the lesion, as fractions of the shorter side
MIN_RING_PIXELS = 150  # fewer ring pixels: the skin tone is unknown

# Reference CIELAB colours of the ABCD rule's six colours, from sRGB prototypes in the spirit of
# Seidenari et al. (Skin Res Technol 2003); each lesion pixel takes the nearest one (Delta E 76).
COLOR_REFS_RGB: dict[str, tuple[int, int, int]] = {
    "light_brown": (181, 120, 80),
    "dark_brown": (115, 65, 40),
    "black": (40, 32, 32),
    "blue_gray": (110, 110, 140),
    "red": (180, 60, 60),
    "white": (215, 205, 215),
}


def _ref_lab() -> np.ndarray:
    rgb = np.array([COLOR_REFS_RGB[n] for n in COLOR_NAMES], dtype=np.float64)[None] / 255.0
    return color.rgb2lab(rgb)[0]


COLOR_REFS_LAB = _ref_lab()


def empty_measurement() -> dict:
    """The measured dict of an image that could not be measured: no claims at all."""
    return {
        "area_pct": None,
        "cut_off": None,
        "colors": None,
        "color_variability": None,
        "color_asymmetry": None,
        "shape_asymmetry": None,
        "blue_gray_pct": None,
        "red_pct": None,
        "hair_pct": None,
        "ita": None,
        "skin_tone": "unknown",
        "mask_ok": False,
    }


def measured_only(result: dict) -> dict:
    """The JSON-able measured part of an ``analyze_image`` result (drops the mask and the problem)."""
    return {k: result[k] for k in MEASURED_KEYS}


def ita_degrees(lightness: float, b_star: float) -> float | None:
    """Individual typology angle (Chardon 1991): atan((L* - 50) / b*) in degrees; None where b* <= 0."""
    if not (b_star > 0 and math.isfinite(lightness)):
        return None
    return math.degrees(math.atan((lightness - 50.0) / b_star))


def skin_ita(rgb: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """ITA of the median L* and b* of the given skin pixels (all pixels when ``where`` is None)."""
    lab = color.rgb2lab(_to_float(rgb))
    pixels = lab[where] if where is not None else lab.reshape(-1, 3)
    if len(pixels) == 0:
        return None
    return ita_degrees(float(np.median(pixels[:, 0])), float(np.median(pixels[:, 2])))


def _to_float(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)


def _problem(rgb: np.ndarray) -> str | None:
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        return "not an RGB image"
    if min(rgb.shape[:2]) < MIN_SIDE:
        return f"smaller than {MIN_SIDE} px"
    if rgb.shape[2] == 4 and (rgb[..., 3] >= 128).mean() < MIN_FOV_FRACTION:
        return "mostly transparent: too few visible pixels"
    sample = rgb[::4, ::4, :3].astype(np.int16)
    if np.abs(sample[..., 0] - sample[..., 1]).mean() < 1.5 and np.abs(sample[..., 1] - sample[..., 2]).mean() < 1.5:
        return "grayscale: colours cannot be measured"
    gray = rgb[:: max(1, max(rgb.shape[:2]) // 256), :: max(1, max(rgb.shape[:2]) // 256), :3].mean(axis=2)
    if gray.std() > NOISE_MIN_STD and np.corrcoef(gray[:, :-1].ravel(), gray[:, 1:].ravel())[0, 1] < NOISE_MAX_CORR:
        return "no spatial structure (the image looks like noise)"
    return None


def _resize(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = WORK_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb[..., :3]).resize(size, Image.BILINEAR), dtype=np.float32) / 255.0


def _open_close(mask: np.ndarray, radius: int, op) -> np.ndarray:
    """Binary opening/closing on an edge-padded copy, so a lesion cut by the frame keeps its border pixels."""
    padded = np.pad(mask, radius + 1, mode="edge")
    return op(padded, morphology.disk(radius))[radius + 1 : -radius - 1, radius + 1 : -radius - 1]


def field_of_view(img: np.ndarray) -> np.ndarray:
    """Pixels inside the dermoscope's field: excludes dark regions connected to the image border."""
    dark = img.max(axis=2) < FOV_DARK
    dark = _open_close(dark, 1, ndi.binary_opening)
    lab, n = ndi.label(dark)
    if n == 0:
        return np.ones(dark.shape, bool)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    outside = np.isin(lab, edge[edge > 0])
    # the vignette's soft edge is darker than skin; keep it out of the threshold
    outside = ndi.binary_dilation(outside, iterations=3)
    return ~outside


def remove_hair(img: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Black-hat hair and ruler-mark removal: thin dark lines are replaced by the closed image."""
    gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
    footprint = morphology.disk(HAIR_RADIUS, decomposition="sequence")
    hair = morphology.black_tophat(gray, footprint) > HAIR_CONTRAST
    hair &= fov
    hair = morphology.remove_small_objects(hair, max_size=11)
    hair = ndi.binary_dilation(hair, iterations=1)
    clean = img.copy()
    if hair.any():
        closed = np.stack(
            [ndi.grey_closing(img[..., c], footprint=morphology.disk(HAIR_RADIUS)) for c in range(3)], axis=2
        )
        clean[hair] = closed[hair]
    return clean, hair


def _split(channel: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, float]:
    """Otsu on ``channel`` inside the field of view, then the largest central component with holes
    filled; returns (mask, mean channel inside minus outside)."""
    h, w = fov.shape
    values = channel[fov]
    if values.size < 100 or values.max() - values.min() < 1e-3:
        return np.zeros_like(fov), 0.0
    candidate = (channel > filters.threshold_otsu(values)) & fov
    candidate = _open_close(candidate, 2, ndi.binary_opening)
    lab, n = ndi.label(candidate)
    if n == 0:
        return np.zeros_like(fov), 0.0
    areas = ndi.sum_labels(candidate, lab, index=np.arange(1, n + 1))
    centres = np.array(ndi.center_of_mass(candidate, lab, index=np.arange(1, n + 1)))
    dist = np.hypot((centres[:, 0] - h / 2) / (h / 2), (centres[:, 1] - w / 2) / (w / 2)) / math.sqrt(2)
    mask = lab == (int(np.argmax(areas * (1.0 - 0.8 * dist) ** 2)) + 1)
    mask = ndi.binary_fill_holes(_open_close(mask, 3, ndi.binary_closing)) & fov
    inside, outside = channel[mask], channel[fov & ~mask]
    return mask, float(inside.mean() - outside.mean()) if inside.size and outside.size else 0.0


def _plausible(mask: np.ndarray, fov: np.ndarray, contrast: float, min_contrast: float) -> bool:
    fraction = mask.sum() / max(fov.sum(), 1)
    return contrast >= min_contrast and MIN_LESION_FRACTION <= fraction <= MAX_LESION_FRACTION


def segment(img: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, float]:
    """Lesion mask from the smoothed inverted blue channel (pigment absorbs blue); where that finds no
    plausible lesion (pink or red lesions, darker skin), from the colour distance to the surrounding
    skin instead. Returns (mask, contrast); the caller rejects a low contrast as "no lesion"."""
    mask, contrast = _split(filters.gaussian(1.0 - img[..., 2], sigma=2.0), fov)
    if _plausible(mask, fov, contrast, MIN_CONTRAST):
        return mask, contrast
    lab = color.rgb2lab(img)
    edge = ndi.distance_transform_edt(np.pad(fov, 1))[1:-1, 1:-1] <= SKIN_BAND * min(fov.shape)
    band = edge & fov
    if band.sum() < MIN_RING_PIXELS:
        return mask, contrast
    skin = np.median(lab[band], axis=0)
    distance = filters.gaussian(np.linalg.norm(lab - skin, axis=2) / 100.0, sigma=2.0)
    mask2, contrast2 = _split(distance, fov)
    if _plausible(mask2, fov, contrast2, MIN_DELTA_E / 100.0):
        return mask2, contrast2
    return mask, contrast


def _principal_axes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)
    pts = np.stack([ys, xs], axis=1).astype(np.float64)
    centre = pts.mean(axis=0)
    cov = np.cov((pts - centre).T) if len(pts) > 2 else np.eye(2)
    _, vecs = np.linalg.eigh(cov)
    return centre, vecs.T  # rows: minor axis, major axis


def shape_asymmetry(mask: np.ndarray) -> float:
    """Largest non-overlap (XOR / area) after mirroring the mask across either principal axis."""
    centre, axes = _principal_axes(mask)
    ys, xs = np.nonzero(mask)
    pts = np.stack([ys, xs], axis=1) - centre
    area = len(pts)
    worst = 0.0
    for axis in axes:
        normal = np.array([-axis[1], axis[0]])
        mirrored = pts - 2.0 * (pts @ normal)[:, None] * normal[None]
        my, mx = np.round(mirrored + centre).astype(int).T
        ok = (my >= 0) & (my < mask.shape[0]) & (mx >= 0) & (mx < mask.shape[1])
        overlap = int(mask[my[ok], mx[ok]].sum())
        worst = max(worst, 1.0 - overlap / area)
    return worst


def color_asymmetry(mask: np.ndarray, lab: np.ndarray) -> float:
    """Largest Delta E between the mean colours of the two halves either side of a principal axis."""
    centre, axes = _principal_axes(mask)
    ys, xs = np.nonzero(mask)
    pts = np.stack([ys, xs], axis=1) - centre
    pixels = lab[ys, xs]
    worst = 0.0
    for axis in axes:
        normal = np.array([-axis[1], axis[0]])
        side = pts @ normal > 0
        if side.sum() < 10 or (~side).sum() < 10:
            continue
        worst = max(worst, float(np.linalg.norm(pixels[side].mean(axis=0) - pixels[~side].mean(axis=0))))
    return worst


def color_fractions(pixels: np.ndarray) -> dict[str, float]:
    """Fraction of lesion pixels nearest to each ABCD reference colour."""
    d = np.linalg.norm(pixels[:, None, :] - COLOR_REFS_LAB[None], axis=2)
    nearest = np.bincount(d.argmin(axis=1), minlength=len(COLOR_NAMES)) / max(len(pixels), 1)
    return {name: round(float(f), 4) for name, f in zip(COLOR_NAMES, nearest, strict=True)}


def _cut_off(mask: np.ndarray, fov: np.ndarray) -> bool:
    """The lesion reaches the image edge or the field-of-view edge along > 5% of its outline."""
    outline = mask & ~ndi.binary_erosion(mask)
    edge = ~ndi.binary_erosion(fov, iterations=2, border_value=0)
    return bool((outline & edge).sum() > 0.05 * max(outline.sum(), 1))


def skin_ring(mask: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The healthy skin the skin tone is read from: a band around the lesion (``RING_GAP`` to ``RING_GAP +
    RING_WIDTH`` of the shorter side), within ``where``; close enough to be the lesion's own skin, far enough
    to miss its blurred border."""
    short = min(mask.shape)
    dist = ndi.distance_transform_edt(~mask)
    return (dist > RING_GAP * short) & (dist <= (RING_GAP + RING_WIDTH) * short) & where


def surrounding_ita(rgb: np.ndarray, mask: np.ndarray) -> float | None:
    """ITA of the skin ring around ``mask`` in the whole frame: the same ring read before and after an edit shows
    how far the edit moved the skin. None where too few ring pixels are left (or b* <= 0)."""
    ring = skin_ring(mask, np.ones(mask.shape, bool))
    return skin_ita(rgb, ring) if ring.sum() >= MIN_RING_PIXELS else None


def _measure(img: np.ndarray, fov: np.ndarray, hair: np.ndarray, mask: np.ndarray) -> dict:
    lab = color.rgb2lab(img)
    pixels = lab[mask]
    colors = color_fractions(pixels)
    ring = skin_ring(mask, fov & ~hair)
    ita = None
    if ring.sum() >= MIN_RING_PIXELS:
        ita = ita_degrees(float(np.median(lab[ring][:, 0])), float(np.median(lab[ring][:, 2])))
    return {
        "area_pct": round(100.0 * float(mask.mean()), 2),
        "cut_off": _cut_off(mask, fov),
        "colors": colors,
        "color_variability": round(float(np.sqrt(pixels.var(axis=0).sum())), 2),
        "color_asymmetry": round(color_asymmetry(mask, lab), 2),
        "shape_asymmetry": round(shape_asymmetry(mask), 4),
        "blue_gray_pct": round(100.0 * colors["blue_gray"], 2),
        "red_pct": round(100.0 * colors["red"], 2),
        "hair_pct": round(100.0 * float(hair[fov].mean()), 2),
        "ita": None if ita is None else round(ita, 2),
        "skin_tone": labels.skin_tone_from_ita(ita),
        "mask_ok": True,
    }


def read_for_analysis(path: str | Path) -> np.ndarray:
    """RGB pixels, or RGBA where the file has transparency, so ``analyze_image`` skips what cannot be seen."""
    rgb, visible = read_rgb(path), read_alpha(path)
    return rgb if visible is None else np.dstack([rgb, visible])


def measure_file(path: str | Path) -> dict:
    """The measured part of one image file's analysis (``measured_only``)."""
    return measured_only(analyze_image(read_for_analysis(path)))


def analysis_workers(requested: int) -> int:
    """Processes for ``measure_files``: ``requested``, or with 0 one per core this process may run on."""
    if requested < 0:
        raise InputError("--analysis_workers", f"must be >= 0, got {requested}", "use 0 (one per core) or a count")
    return requested if requested > 0 else len(os.sched_getaffinity(0))


def measure_files(paths: Sequence[str | Path], workers: int = 1) -> list[dict]:
    """``measure_file`` of each path, in order. The analyzer is single-threaded numpy and scipy, so ``workers``
    above 1 spreads the images over that many processes, with the same results. Where the platform can, they are
    forked: a spawned worker would first re-run the caller's main script, which a script without a main guard does
    not survive; the workers use no torch, so the thread pools a fork copies stay unused."""
    from tqdm import tqdm

    paths = [str(p) for p in paths]
    bar = dict(total=len(paths), desc="analyze", unit="img", disable=None)
    if workers <= 1 or len(paths) < 4 * workers:  # starting processes costs more than a few images
        return [measure_file(p) for p in tqdm(paths, **bar)]
    chunk = max(1, min(32, len(paths) // (8 * workers)))
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(tqdm(pool.map(measure_file, paths, chunksize=chunk), **bar))


def analyze_image(rgb: np.ndarray) -> dict:
    """Measure one RGB or RGBA image: the ``MEASURED_KEYS`` plus ``mask`` (bool, input size) and ``problem``
    (None, or why nothing was measured). Pixels with alpha below 128 are outside the field of view."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.asarray(rgb, np.float64) * (255.0 if rgb.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    shape = rgb.shape[:2]
    result = {**empty_measurement(), "mask": np.zeros(shape, bool), "problem": _problem(rgb)}
    if result["problem"]:
        return result
    img = _resize(rgb)
    fov = field_of_view(img)
    if rgb.shape[2] == 4:  # a transparent pixel is neither skin nor lesion, whatever colour lies under it
        fov &= _resize(np.repeat(rgb[..., 3:], 3, axis=2))[..., 0] >= 0.5
    if fov.mean() < MIN_FOV_FRACTION:
        result["problem"] = "no field of view (black or nearly black frame)"
        return result
    clean, hair = remove_hair(img, fov)
    mask, contrast = segment(clean, fov)
    fraction = mask.sum() / max(fov.sum(), 1)
    if contrast < min(MIN_CONTRAST, MIN_DELTA_E / 100.0) or fraction < MIN_LESION_FRACTION:
        result["problem"] = "no lesion found"
        return result
    if fraction > MAX_LESION_FRACTION:
        result["problem"] = "the lesion fills the whole field of view"
        return result
    result.update(_measure(clean, fov, hair, mask))
    big = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.BILINEAR)
    result["mask"] = np.asarray(big) >= 128
    return result


SHEET_THUMB, SHEET_MAX = 128, 64  # contact sheet: thumbnail side and how many images it shows


@dataclass
class AnalyzeConfig:
    """Measure every dermoscopic image in a folder: lesion masks, descriptors and ITA skin tone."""

    images: str = option(help="folder of images (searched recursively)")
    output_dir: str = option(help="output folder for measured.jsonl, masks/ and contact_sheet.png", aliases=("--out",))
    limit: int | None = option(None, help="analyse at most this many images (sorted by path)")

    def __post_init__(self) -> None:
        if not Path(self.images).is_dir():
            problem = "is a file, not an image folder" if Path(self.images).exists() else "image folder not found"
            raise InputError(self.images, problem, "pass the folder holding the images to --images")
        if self.limit is not None and self.limit < 1:
            raise InputError("--limit", f"must be at least 1, got {self.limit}", "pass a positive number, or omit it")


def mask_names(files: list[Path], folder: Path) -> dict[Path, str]:
    """``<stem>.png`` per image; stems that repeat across subfolders get their relative path instead."""
    stems: dict[str, int] = {}
    for p in files:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    return {
        p: (p.stem if stems[p.stem] == 1 else p.relative_to(folder).with_suffix("").as_posix().replace("/", "__"))
        + ".png"
        for p in files
    }


def _outlined_thumb(rgb: np.ndarray, mask: np.ndarray, ok: bool) -> Image.Image:
    thumb = Image.fromarray(rgb).resize((SHEET_THUMB, SHEET_THUMB), Image.BILINEAR)
    pixels = np.array(thumb)
    if ok:
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((SHEET_THUMB, SHEET_THUMB))) >= 128
        outline = small & ~ndi.binary_erosion(small, iterations=2)
        pixels[outline] = (0, 255, 0)
    else:
        pixels[:6] = (255, 0, 0)  # a red bar: nothing was measured
    return Image.fromarray(pixels)


def write_contact_sheet(path: Path, thumbs: list[Image.Image]) -> None:
    if not thumbs:
        return
    with atomic_path(path) as tmp:
        image_grid(thumbs, cols=min(8, len(thumbs)), fill=(255, 255, 255)).save(tmp, format="PNG")


def analyze_folder(cfg: AnalyzeConfig) -> dict:
    """Analyse a folder; writes ``measured.jsonl`` (file_name + the measured keys), ``masks/<stem>.png``
    for every image with a usable mask, ``contact_sheet.png`` and ``summary.json``."""
    import time

    from tqdm import tqdm

    folder, out = Path(cfg.images), Path(cfg.output_dir)
    files = list_images(folder)[: cfg.limit] if cfg.limit else list_images(folder)
    if not files:
        raise InputError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) found", "check --images")
    names = mask_names(files, folder)
    rows, thumbs, problems = [], [], {}
    start = time.perf_counter()
    for path in tqdm(files, desc="analyze", unit="img", disable=None):
        file_name = path.relative_to(folder).as_posix()
        try:
            pixels = read_for_analysis(path)
        except UnreadableImage as e:
            rgb, result = None, {**empty_measurement(), "problem": f"unreadable image ({e.reason})"}
        else:
            rgb, result = pixels[..., :3], analyze_image(pixels)
        if result["problem"]:
            problems[result["problem"]] = problems.get(result["problem"], 0) + 1
        elif rgb is not None:
            with atomic_path(out / "masks" / names[path]) as tmp:
                Image.fromarray(result["mask"].astype(np.uint8) * 255).save(tmp, format="PNG")
        if rgb is not None and len(thumbs) < SHEET_MAX:
            thumbs.append(_outlined_thumb(rgb, result["mask"], result["mask_ok"]))
        rows.append({"file_name": file_name, **measured_only(result)})
    seconds = time.perf_counter() - start
    write_jsonl(out / "measured.jsonl", rows)
    write_contact_sheet(out / "contact_sheet.png", thumbs)
    tones: dict[str, int] = {}
    for r in rows:
        tones[r["skin_tone"]] = tones.get(r["skin_tone"], 0) + 1
    summary = {
        "images": len(rows),
        "mask_ok": sum(r["mask_ok"] for r in rows),
        "problems": problems,
        "skin_tone": tones,
        "seconds_per_image": round(seconds / len(rows), 4),
    }
    write_json(out / "summary.json", summary)
    print(
        f"analysed {summary['images']} images, {summary['mask_ok']} with a usable mask ({summary['seconds_per_image']} s/image)"
    )
    if problems:
        print("not measured: " + ", ".join(f"{n} {p}" for p, n in problems.items()))
    print(f"wrote {out / 'measured.jsonl'}, {out / 'masks'}, {out / 'contact_sheet.png'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    prog = "python -m lesiongen.captions.analyze"
    return run_stage(analyze_folder, AnalyzeConfig, argv, prog, "the image analyzer", reads=("images",))


if __name__ == "__main__":
    sys.exit(main())
