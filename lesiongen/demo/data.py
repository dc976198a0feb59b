"""The demo's built-in dataset: seeded dermoscopy-like lesion images whose look follows their metadata.

Nothing downloads in ``make demo``, so it draws its own data: a HAM10000-schema CSV (plus ``skin_tone``
and the seven Derm7pt checklist columns, which ``metadata.load_ham10000`` reads) and one PNG per row.
Each image is rendered from its row: the diagnosis sets colour, size, shape and border; every checklist
concept that is not ``absent`` is drawn (network, streaks, blotches, regression, dots, veil, vessels),
so concept captions are true to the pixels; the skin tone sets the background's ITA angle; hair is
added more often on male and head/trunk sites. Some lesions are photographed two or three times
(moved, rotated, rescaled), so a split by image rather than by ``lesion_id`` would leak.

``python -m lesiongen.demo.data --output_dir DIR`` writes ``DIR/metadata.csv`` and ``DIR/images/<image_id>.png``.
"""

from __future__ import annotations

import csv
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from skimage.color import lab2rgb

from .. import labels
from ..captions.concepts import impute_concepts
from ..cli import option, parse_config, run
from ..errors import InputError
from ..files import atomic_dir, write_json

Colour = tuple[float, float, float]


@dataclass(frozen=True)
class Look:
    """How one diagnosis looks: base colours (sRGB 0..1), size, outline and edge."""

    centre: Colour
    rim: Colour
    radius: tuple[float, float]  # lesion radius as a fraction of the half image width
    irregularity: float  # amplitude of the border's angular harmonics
    aspect: tuple[float, float]  # range of the ellipse axis ratio
    edge: float  # width of the soft border, fraction of the radius


# Colours follow the dermoscopic textbook picture of each class: melanoma dark and multicoloured, nevus
# uniform brown, keratosis tan and waxy, BCC pink-pearly, AK red-pink and scaly, dermatofibroma pink-brown
# with a white centre, vascular lesions red-purple. Sizes and border irregularity differ too, so every
# class can be told from 64-pixel images.
LOOKS: dict[str, Look] = {
    "akiec": Look((0.80, 0.45, 0.42), (0.86, 0.58, 0.52), (0.50, 0.68), 0.10, (1.0, 1.4), 0.35),
    "bcc": Look((0.88, 0.68, 0.70), (0.92, 0.76, 0.76), (0.45, 0.62), 0.08, (1.0, 1.3), 0.18),
    "bkl": Look((0.62, 0.47, 0.30), (0.70, 0.56, 0.38), (0.45, 0.65), 0.07, (1.2, 1.6), 0.10),
    "df": Look((0.62, 0.42, 0.36), (0.70, 0.52, 0.46), (0.26, 0.38), 0.03, (1.0, 1.15), 0.45),
    "mel": Look((0.22, 0.12, 0.08), (0.42, 0.26, 0.17), (0.60, 0.80), 0.20, (1.0, 1.5), 0.12),
    "nv": Look((0.42, 0.26, 0.15), (0.52, 0.34, 0.21), (0.34, 0.50), 0.025, (1.0, 1.15), 0.15),
    "vasc": Look((0.62, 0.10, 0.20), (0.72, 0.20, 0.28), (0.30, 0.45), 0.03, (1.0, 1.2), 0.06),
}

# Per-class demographics, roughly HAM10000's: (age mean, age sd, P(male), site weights).
DEMOGRAPHICS: dict[str, tuple[float, float, float, dict[str, float]]] = {
    "akiec": (67, 11, 0.67, {"face": 4, "scalp": 1, "upper extremity": 2, "back": 1, "chest": 1, "lower extremity": 1}),
    "bcc": (66, 12, 0.60, {"back": 4, "face": 2, "chest": 1, "upper extremity": 1, "lower extremity": 1, "neck": 1}),
    "bkl": (63, 13, 0.55, {"face": 3, "back": 3, "chest": 1, "upper extremity": 1, "lower extremity": 2, "abdomen": 1}),
    "df": (50, 14, 0.45, {"lower extremity": 6, "upper extremity": 2, "back": 1, "abdomen": 1}),
    "mel": (61, 15, 0.58, {"back": 4, "lower extremity": 2, "upper extremity": 2, "face": 1, "chest": 1, "abdomen": 1}),
    "nv": (42, 15, 0.50, {"back": 4, "lower extremity": 3, "abdomen": 2, "upper extremity": 1, "chest": 1, "face": 1}),
    "vasc": (50, 18, 0.45, {"lower extremity": 3, "abdomen": 2, "back": 2, "upper extremity": 1, "face": 2}),
}
DX_TYPE_BY_DX = {
    "akiec": "histo",
    "bcc": "histo",
    "mel": "histo",
    "bkl": "consensus",
    "df": "consensus",
    "nv": "follow_up",
    "vasc": "consensus",
}

# Class sizes relative to --images_per_class: a mild version of HAM10000's imbalance (nevi dominate),
# so the demo's balanced synthetic set has something to balance.
CLASS_WEIGHTS: dict[str, float] = {"nv": 2.0, "mel": 1.4, "bkl": 1.2, "bcc": 1.0, "akiec": 0.8, "vasc": 0.7, "df": 0.7}

# Skin tones as CIELAB (L*, a*, b*), each inside its ITA band of labels.SKIN_TONES, and how often
# each is drawn (dermoscopy datasets are mostly light skin; the darker tones are there to be measured).
SKIN_LAB: dict[str, tuple[float, float, float]] = {
    "very light": (76.0, 9.0, 13.0),  # ITA 63
    "light": (68.0, 11.0, 16.0),  # ITA 48
    "intermediate": (62.0, 12.0, 18.0),  # ITA 34
    "tan": (56.0, 12.0, 18.0),  # ITA 18
    "brown": (46.0, 11.0, 17.0),  # ITA -13
    "dark": (33.0, 9.0, 15.0),  # ITA -49
}
SKIN_WEIGHTS: dict[str, float] = {"very light": 3, "light": 3, "intermediate": 2, "tan": 1.2, "brown": 0.8, "dark": 0.6}
SUPERSAMPLE = 2  # drawn at twice the size and downsampled, so thin lines survive as soft strokes


@dataclass
class DemoDataConfig:
    """Write the demo's seeded lesion images and their HAM10000-schema metadata CSV."""

    output_dir: str = option(
        "demo_output/data", help="output folder (metadata.csv, images/, summary.json)", aliases=("--out",)
    )
    images_per_class: int = option(40, help="images of a weight-1 class; nevi get 2x, melanoma 1.4x, ...")
    resolution: int = option(64, help="image side in pixels")
    seed: int = option(0, help="seed; the same seed gives the same bytes")
    repeat_fraction: float = option(0.3, help="fraction of lesions photographed 2-3 times")

    def __post_init__(self) -> None:
        if self.images_per_class < 4:
            raise InputError("--images_per_class", f"{self.images_per_class} is too few", "use 4 or more")
        if not 16 <= self.resolution <= 1024:
            raise InputError("--resolution", f"{self.resolution} is outside 16..1024", "use e.g. 64")
        if not 0 <= self.repeat_fraction <= 1:
            raise InputError("--repeat_fraction", f"{self.repeat_fraction} is not a fraction", "use a value in 0..1")


CSV_COLUMNS = (
    *("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"),
    "skin_tone",
    *labels.CONCEPT_NAMES,
)


def skin_rgb(tone: str) -> np.ndarray:
    return lab2rgb(np.array([[SKIN_LAB[tone]]]))[0, 0]


def draw_lesion_row(rng: random.Random, dx: str, lesion_id: str, image_id: str) -> dict:
    """One metadata row: demographics by diagnosis, concepts from Derm7pt's P(value | diagnosis)."""
    age_mean, age_sd, p_male, sites = DEMOGRAPHICS[dx]
    age = int(round(min(85, max(5, rng.gauss(age_mean, age_sd))) / 5) * 5)  # HAM10000 rounds to 5 years
    tones = list(SKIN_WEIGHTS)
    row = {
        "lesion_id": lesion_id,
        "image_id": image_id,
        "dx": dx,
        "dx_type": DX_TYPE_BY_DX[dx],
        "age": age,
        "sex": "male" if rng.random() < p_male else "female",
        "localization": rng.choices(list(sites), weights=list(sites.values()))[0],
        "skin_tone": rng.choices(tones, weights=[SKIN_WEIGHTS[t] for t in tones])[0],
    }
    row.update(impute_concepts(dx, rng))
    return row


class Canvas:
    """An RGB float image at supersampled size, with lesion-frame coordinates for one photograph.

    A lesion is described in its own frame (unit radius around the origin); each photograph of it
    places that frame with its own shift, rotation and scale, so repeated images differ in pose only.
    """

    def __init__(self, size: int, background: np.ndarray, centre: tuple[float, float], angle: float, scale: float):
        self.size = size
        self.img = np.broadcast_to(background, (size, size, 3)).copy()
        self.centre = np.array(centre) * size / 2 + size / 2
        self.scale = scale * size / 2
        self.rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        d = np.stack([xs - self.centre[0], ys - self.centre[1]], -1) / self.scale
        uv = d @ self.rot  # inverse rotation (rot is orthonormal)
        self.u, self.v = uv[..., 0], uv[..., 1]

    def to_px(self, pts: np.ndarray) -> list[tuple[float, float]]:
        xy = np.asarray(pts, float).reshape(-1, 2) @ self.rot.T * self.scale + self.centre
        return [tuple(p) for p in xy]

    def paint(self, alpha: np.ndarray, colour) -> None:
        a = np.clip(alpha, 0, 1)[..., None]
        self.img = self.img * (1 - a) + np.asarray(colour, float) * a

    def stroke_mask(self, draw_fn, blur: float = 0.0) -> np.ndarray:
        """Rasterise PIL drawing commands (in pixel coordinates) into a 0..1 mask."""
        m = Image.new("L", (self.size, self.size), 0)
        draw_fn(ImageDraw.Draw(m))
        if blur:
            m = m.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(m, np.float32) / 255.0


@dataclass
class Shape:
    """The lesion outline in its own frame: radius(theta) = r0 * (1 + sum of harmonics), an ellipse."""

    r0: float
    aspect: float
    harmonics: list[tuple[int, float, float]]
    edge: float

    def radius(self, theta: np.ndarray) -> np.ndarray:
        r = np.ones_like(theta)
        for k, amp, phase in self.harmonics:
            r = r + amp * np.cos(k * theta + phase)
        return self.r0 * r

    def inside(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(soft mask, normalised radius) where radius 1 is the border."""
        uu, vv = u, v * self.aspect
        theta = np.arctan2(vv, uu)
        rho = np.hypot(uu, vv) / self.radius(theta)
        mask = np.clip((1 - rho) / self.edge + 0.5, 0, 1)
        return mask, rho


def draw_shape(rng: random.Random, look: Look) -> Shape:
    harmonics = [
        (k, look.irregularity * rng.uniform(0.3, 1.0) / (1 + 0.3 * (k - 2)), rng.uniform(0, 2 * math.pi))
        for k in range(2, 8)
    ]
    return Shape(rng.uniform(*look.radius), rng.uniform(*look.aspect), harmonics, look.edge)


def _points_in_lesion(rng: random.Random, n: int, rmin: float, rmax: float, sector: float = 2 * math.pi) -> np.ndarray:
    start = rng.uniform(0, 2 * math.pi)
    out = []
    for _ in range(n):
        t = start + rng.uniform(0, sector)
        r = math.sqrt(rng.uniform(rmin**2, rmax**2))
        out.append((r * math.cos(t), r * math.sin(t)))
    return np.array(out).reshape(-1, 2)


def render(row: dict, resolution: int, lesion_seed: int, image_seed: int, pose: bool = True) -> np.ndarray:
    """Render one photograph of a lesion as uint8 RGB; the same seeds give the same pixels.

    Everything about the lesion comes from ``lesion_seed`` (shared by all photographs of one lesion_id);
    pose, lighting and hair come from ``image_seed``.
    """
    L = random.Random(lesion_seed ^ 0x5EED)  # decorrelated from the row draw that used lesion_seed
    rng_img = random.Random(image_seed)
    dx = row["dx"]
    look = LOOKS[dx]
    size = resolution * SUPERSAMPLE
    skin = skin_rgb(row["skin_tone"])
    # Lesion colours darken a little on darker skin, as melanin under the lesion does.
    skin_lum = float(np.dot(skin, [0.3, 0.59, 0.11]))
    tint = 0.75 + 0.25 * min(1.0, skin_lum / 0.7)
    shape = draw_shape(L, look)
    if pose:
        centre = (rng_img.uniform(-0.08, 0.08), rng_img.uniform(-0.08, 0.08))
        angle, scale = rng_img.uniform(0, 2 * math.pi), rng_img.uniform(0.9, 1.1)
    else:
        centre, angle, scale = (0.0, 0.0), 0.0, 1.0
    c = Canvas(size, skin, centre, angle, scale)
    # Skin texture: low-frequency shading so backgrounds are not flat.
    noise = np.random.default_rng(image_seed).normal(0, 1, (8, 8))
    shade = (
        np.asarray(
            Image.fromarray(((noise - noise.min()) / (np.ptp(noise) + 1e-6) * 255).astype(np.uint8)).resize(
                (size, size), Image.BICUBIC
            ),
            np.float32,
        )
        / 255.0
    )
    c.img = c.img * (0.94 + 0.08 * shade[..., None])

    mask, rho = shape.inside(c.u, c.v)
    base = np.array(look.centre) * tint
    rim = np.array(look.rim) * tint
    grad = np.clip(rho, 0, 1)[..., None]
    c.paint(mask, base * (1 - grad) + rim * grad)
    _class_features(c, L, dx, shape, mask, rho, tint)
    _concepts(c, L, row, shape, mask, rho, tint)
    _hair(c, rng_img, row)

    # Dermoscope lighting: the corners (outside the inscribed circle) fall off slightly.
    r2 = ((np.mgrid[0:size, 0:size] + 0.5 - size / 2) / (size / 2)) ** 2
    c.img = c.img * (1 - 0.15 * np.clip(r2.sum(0) - 1.0, 0, None))[..., None]
    out = Image.fromarray((np.clip(c.img, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(out.resize((resolution, resolution), Image.LANCZOS))


def _blob(c: Canvas, L: random.Random, centre: tuple[float, float], radius: float, irregular: float) -> np.ndarray:
    harmonics = [(k, irregular * L.uniform(0.3, 1), L.uniform(0, 6.3)) for k in (2, 3, 5)]
    s = Shape(radius, 1.0, harmonics, 0.5)
    m, _ = s.inside(c.u - centre[0], c.v - centre[1])
    return m


def _class_features(
    c: Canvas, L: random.Random, dx: str, shape: Shape, mask: np.ndarray, rho: np.ndarray, tint: float
) -> None:
    """Structures that are part of a class's look whatever its checklist says."""
    r0 = shape.r0
    if dx == "df":  # central white scar-like patch
        c.paint(_blob(c, L, (0, 0), r0 * 0.45, 0.1) * 0.85, (0.93, 0.90, 0.86))
    elif dx == "bcc":  # blue-grey ovoid nests
        for p in _points_in_lesion(L, L.randint(2, 4), 0.1 * r0, 0.7 * r0):
            c.paint(_blob(c, L, tuple(p), r0 * L.uniform(0.12, 0.2), 0.15) * mask * 0.9, (0.36, 0.40, 0.50))
    elif dx == "vasc":  # dark red-purple lacunae
        for p in _points_in_lesion(L, L.randint(4, 7), 0.0, 0.75 * r0):
            c.paint(_blob(c, L, tuple(p), r0 * L.uniform(0.12, 0.2), 0.05) * mask, (0.38, 0.03, 0.16))
    elif dx == "akiec":  # white-yellow surface scale
        for p in _points_in_lesion(L, L.randint(3, 5), 0.0, 0.8 * r0):
            c.paint(_blob(c, L, tuple(p), r0 * L.uniform(0.1, 0.2), 0.3) * mask * 0.8, (0.95, 0.92, 0.80))
    elif dx == "bkl":  # milia-like cysts: small bright round spots
        for p in _points_in_lesion(L, L.randint(2, 5), 0.1 * r0, 0.8 * r0):
            c.paint(_blob(c, L, tuple(p), r0 * 0.06, 0.0) * mask, (0.93, 0.90, 0.78))
    elif dx == "mel":  # a second, off-centre dark-brown to black zone: colour variegation
        p = _points_in_lesion(L, 1, 0.2 * r0, 0.5 * r0)[0]
        c.paint(
            _blob(c, L, tuple(p), r0 * L.uniform(0.35, 0.5), 0.3) * mask * 0.85, np.array((0.10, 0.06, 0.05)) * tint
        )


def _concepts(
    c: Canvas, L: random.Random, row: dict, shape: Shape, mask: np.ndarray, rho: np.ndarray, tint: float
) -> None:
    """Draw each checklist concept that is present; absent ones draw nothing."""
    r0, px = shape.r0, c.scale  # px converts a lesion-frame length to pixels
    dark = np.array((0.16, 0.09, 0.06)) * tint

    net = row["pigment_network"]
    if net != "absent":
        # A mesh of about 4-6 pixels at 64 px: finer meshes vanish when the image is downsampled.
        period = max(0.12, 0.3 * r0) if net == "typical" else max(0.15, 0.4 * r0)
        warp = 0.0 if net == "typical" else 0.35
        phase_noise = warp * np.sin(c.u * 9 + L.uniform(0, 6)) * np.cos(c.v * 7 + L.uniform(0, 6))
        gu = np.abs(np.sin(np.pi * (c.u / period + phase_noise)))
        gv = np.abs(np.sin(np.pi * (c.v / period - phase_noise)))
        lines = np.clip(1 - np.minimum(gu, gv) / (0.35 if net == "typical" else 0.42), 0, 1)
        fade = (
            np.clip(1.3 - rho, 0, 1)
            if net == "typical"
            else (np.sin(np.arctan2(c.v, c.u) * 2 + L.uniform(0, 6)) > -0.3)
        )
        c.paint(lines * mask * fade * (0.75 if net == "typical" else 0.85), dark)

    streaks = row["streaks"]
    if streaks != "absent":
        n, sector = (L.randint(10, 14), 2 * math.pi) if streaks == "regular" else (L.randint(5, 8), L.uniform(1.5, 3.0))
        start = L.uniform(0, 2 * math.pi)

        def draw_streaks(d: ImageDraw.ImageDraw) -> None:
            for i in range(n):
                t = start + (i / n * sector if streaks == "regular" else L.uniform(0, sector))
                r_in = float(shape.radius(np.array([t]))[0]) * 0.8
                length = r0 * (0.3 if streaks == "regular" else L.uniform(0.3, 0.6))
                a = np.array([r_in * math.cos(t), r_in * math.sin(t) / shape.aspect])
                b = a + length * np.array([math.cos(t), math.sin(t)])
                d.line(
                    c.to_px(np.stack([a, b])),
                    fill=255,
                    width=max(1, round((0.03 if streaks == "regular" else 0.045) * px)),
                )

        c.paint(c.stroke_mask(draw_streaks, 0.5) * 0.85, dark)

    pig = row["pigmentation"]
    if pig != "absent":
        diffuse, irregular = pig.startswith("diffuse"), pig.endswith("irregular")
        if diffuse:
            centre = (0, 0) if not irregular else tuple(_points_in_lesion(L, 1, 0.15 * r0, 0.3 * r0)[0])
            blot = _blob(c, L, centre, r0 * 0.65, 0.35 if irregular else 0.0)
        else:
            centre = (0, 0) if not irregular else tuple(_points_in_lesion(L, 1, 0.35 * r0, 0.5 * r0)[0])
            blot = _blob(c, L, centre, r0 * 0.3, 0.4 if irregular else 0.0)
        # Blotches are a darker shade of the lesion's own colour, so a pigmented BCC stays a BCC.
        colour = 0.5 * np.array((0.12, 0.07, 0.05)) + 0.5 * 0.4 * np.array(LOOKS[row["dx"]].centre)
        c.paint(blot * mask * 0.85, colour * tint)

    reg = row["regression_structures"]
    if reg != "absent":
        spot = tuple(_points_in_lesion(L, 1, 0.3 * r0, 0.55 * r0)[0])
        if reg in ("white areas", "combinations"):
            c.paint(_blob(c, L, spot, r0 * 0.3, 0.3) * mask * 0.9, (0.95, 0.93, 0.90))
        if reg in ("blue areas", "combinations"):
            spot2 = (-spot[0], -spot[1]) if reg == "combinations" else spot
            area = _blob(c, L, spot2, r0 * 0.3, 0.3) * mask
            pepper = (np.random.default_rng(L.randrange(2**31)).random(area.shape) < 0.5).astype(float)
            c.paint(area * (0.55 + 0.35 * pepper), (0.45, 0.52, 0.62))

    dots = row["dots_and_globules"]
    if dots != "absent":
        if dots == "regular":
            n = L.randint(8, 12)
            start = L.uniform(0, 2 * math.pi)
            pts = [
                (
                    0.5 * r0 * math.cos(start + 2 * math.pi * i / n),
                    0.5 * r0 * math.sin(start + 2 * math.pi * i / n) / shape.aspect,
                )
                for i in range(n)
            ]
            sizes = [0.055 * r0] * n
        else:
            n = L.randint(8, 14)
            pts = [tuple(p) for p in _points_in_lesion(L, n, 0.2 * r0, 1.05 * r0, sector=L.uniform(2.0, 4.0))]
            sizes = [L.uniform(0.035, 0.09) * r0 for _ in range(n)]

        def draw_dots(d: ImageDraw.ImageDraw) -> None:
            for p, s in zip(pts, sizes, strict=True):
                (x, y), rad = c.to_px(np.array(p))[0], max(1.0, s * px)
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=255)

        c.paint(c.stroke_mask(draw_dots, 0.4), np.array((0.10, 0.06, 0.05)) * tint)

    if row["blue_whitish_veil"] == "present":
        spot = tuple(_points_in_lesion(L, 1, 0.0, 0.35 * r0)[0])
        c.paint(_blob(c, L, spot, r0 * 0.45, 0.25) * mask * 0.85, (0.55, 0.66, 0.82))

    vessels = row["vascular_structures"]
    if vessels != "absent":
        _vessels(c, L, vessels, shape)


def _vessels(c: Canvas, L: random.Random, kind: str, shape: Shape) -> None:
    r0, px = shape.r0, c.scale
    red = (0.78, 0.08, 0.12)
    width = max(1, round(0.045 * px))

    def pt(r: float, t: float) -> np.ndarray:
        return np.array([r * math.cos(t), r * math.sin(t)])

    def draw(d: ImageDraw.ImageDraw) -> None:
        if kind == "arborizing":  # a trunk that branches twice, thinning
            for _ in range(2):
                t = L.uniform(0, 2 * math.pi)
                a, b = pt(0.7 * r0, t), pt(0.05 * r0, t + L.uniform(-0.4, 0.4))
                d.line(c.to_px(np.stack([a, b])), fill=255, width=width + 1)
                for f in (0.35, 0.65):
                    m = a + f * (b - a)
                    for s in (-1, 1):
                        e = m + pt(0.3 * r0, t + math.pi + s * L.uniform(0.5, 1.0))
                        d.line(c.to_px(np.stack([m, e])), fill=255, width=width)
        elif kind in ("dotted", "within regression"):
            rmax = 0.8 * r0 if kind == "dotted" else 0.35 * r0
            for p in _points_in_lesion(L, L.randint(10, 16), 0.0, rmax):
                (x, y), rad = c.to_px(p)[0], max(1.0, 0.035 * r0 * px)
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=255)
        elif kind == "comma":
            for p in _points_in_lesion(L, L.randint(4, 6), 0.1 * r0, 0.7 * r0):
                t = L.uniform(0, 2 * math.pi)
                arc = np.stack([p + pt(0.12 * r0, t + s * 0.6) * (1 + 0.5 * s) for s in np.linspace(0, 1, 5)])
                d.line(c.to_px(arc), fill=255, width=width)
        elif kind == "hairpin":
            for p in _points_in_lesion(L, L.randint(3, 5), 0.2 * r0, 0.8 * r0):
                t = math.atan2(p[1], p[0])
                side = pt(0.05 * r0, t + math.pi / 2)
                tip = p - pt(0.25 * r0, t)
                loop = np.stack([p + side, tip + side, tip - side, p - side])
                d.line(c.to_px(loop), fill=255, width=width)
        elif kind == "wreath":
            n = L.randint(8, 12)
            for i in range(n):
                t0 = 2 * math.pi * i / n
                arc = np.stack([pt(0.85 * r0, t0 + s * 0.35) for s in np.linspace(0, 1, 4)])
                d.line(c.to_px(arc), fill=255, width=width)
        else:  # linear irregular: jagged polylines
            for _ in range(L.randint(2, 4)):
                p = _points_in_lesion(L, 1, 0.0, 0.6 * r0)[0]
                path = [p]
                for _ in range(5):
                    path.append(path[-1] + pt(0.15 * r0, L.uniform(0, 2 * math.pi)))
                d.line(c.to_px(np.stack(path)), fill=255, width=width)

    c.paint(c.stroke_mask(draw, 0.4) * 0.9, red)


def _hair(c: Canvas, rng: random.Random, row: dict) -> None:
    """Dark hairs, more often on men and on the head and trunk, as in dermoscopy collections."""
    p = (
        0.25
        + (0.25 if row["sex"] == "male" else 0)
        + (0.15 if labels.SITE_GROUPS[row["localization"]] in ("head and neck", "trunk") else 0)
    )
    if rng.random() > p:
        return
    n = rng.randint(1, 5)
    colour = (0.08, 0.06, 0.05)

    def draw(d: ImageDraw.ImageDraw) -> None:
        s = c.size
        for _ in range(n):
            a = np.array([rng.uniform(-0.1, 1.1) * s, rng.uniform(-0.1, 1.1) * s])
            b = np.array([rng.uniform(-0.1, 1.1) * s, rng.uniform(-0.1, 1.1) * s])
            m = (a + b) / 2 + np.array([rng.uniform(-0.2, 0.2) * s, rng.uniform(-0.2, 0.2) * s])
            curve = [tuple((1 - t) ** 2 * a + 2 * (1 - t) * t * m + t**2 * b) for t in np.linspace(0, 1, 12)]
            d.line(curve, fill=255, width=max(1, round(s / 90)))

    c.paint(c.stroke_mask(draw, 0.3) * 0.9, colour)


def plan_rows(cfg: DemoDataConfig) -> list[tuple[dict, int, int]]:
    """(row, lesion seed, image seed) for every image, class by class, some lesions photographed 2-3 times."""
    rng = random.Random(cfg.seed)
    plan: list[tuple[dict, int, int]] = []
    n_lesion = 0
    for dx in labels.CODES:
        target = max(4, round(cfg.images_per_class * CLASS_WEIGHTS[dx]))
        made = 0
        while made < target:
            n_lesion += 1
            repeats = 1 if rng.random() >= cfg.repeat_fraction else rng.choice((2, 2, 3))
            repeats = min(repeats, target - made)
            lesion_seed = rng.randrange(2**31)
            base = draw_lesion_row(random.Random(lesion_seed), dx, f"demo_lesion_{n_lesion:05d}", "")
            for _ in range(repeats):
                made += 1
                row = dict(base, image_id=f"demo_{len(plan) + 1:05d}")
                plan.append((row, lesion_seed, rng.randrange(2**31)))
    return plan


def make_demo_data(cfg: DemoDataConfig) -> dict:
    """Write metadata.csv, images/ and summary.json; the folder appears only when complete."""
    plan = plan_rows(cfg)
    out = Path(cfg.output_dir)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for row, lesion_seed, image_seed in plan:
            Image.fromarray(render(row, cfg.resolution, lesion_seed, image_seed)).save(
                tmp / "images" / f"{row['image_id']}.png"
            )
        with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(row for row, _, _ in plan)
        rows = [r for r, _, _ in plan]
        summary = {
            "config": asdict(cfg),
            "images": len(rows),
            "lesions": len({r["lesion_id"] for r in rows}),
            "per_class": {dx: sum(r["dx"] == dx for r in rows) for dx in labels.CODES},
            "per_skin_tone": {t: sum(r["skin_tone"] == t for r in rows) for t in SKIN_LAB},
        }
        write_json(tmp / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    def stage(cfg: DemoDataConfig) -> None:
        s = make_demo_data(cfg)
        print(f"wrote {s['images']} images of {s['lesions']} lesions to {cfg.output_dir}: {s['per_class']}")

    return run(lambda: stage(parse_config(DemoDataConfig, argv, prog="python -m lesiongen.demo.data")))


if __name__ == "__main__":
    sys.exit(main())
