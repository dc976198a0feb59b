"""The demo's built-in data: loadable as HAM10000, deterministic, concepts visible, classes learnable."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2lab
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score

from lesiongen import labels
from lesiongen.captions.metadata import load_ham10000
from lesiongen.demo.data import SKIN_LAB, DemoDataConfig, draw_lesion_row, main, make_demo_data, render
from lesiongen.errors import InputError


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    summary = make_demo_data(DemoDataConfig(output_dir=str(out), images_per_class=24, seed=3))
    return out, summary


def _rows(out):
    with open(out / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_metadata_loads_as_ham10000_with_concepts(demo_data):
    out, summary = demo_data
    records = load_ham10000(out / "metadata.csv").records
    assert len(records) == summary["images"]
    assert {r.dx for r in records} == set(labels.CODES)
    assert all(r.concept_source == "metadata" and set(r.concepts) == set(labels.CONCEPT_NAMES) for r in records)
    assert {r.skin_tone for r in records} <= set(labels.SKIN_TONE_NAMES)
    assert all(r.age is not None and r.age % 5 == 0 for r in records)
    # nevi outnumber dermatofibromas, as in HAM10000, so a balanced synthetic set has work to do
    counts = summary["per_class"]
    assert counts["nv"] > counts["df"] >= 4


def test_images_decode_at_resolution_and_some_lesions_repeat(demo_data):
    out, _ = demo_data
    rows = _rows(out)
    for r in rows:
        with Image.open(out / "images" / f"{r['image_id']}.png") as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    by_lesion: dict[str, list[dict]] = {}
    for r in rows:
        by_lesion.setdefault(r["lesion_id"], []).append(r)
    repeated = [v for v in by_lesion.values() if len(v) > 1]
    assert len(repeated) >= 5
    for photos in repeated:  # one lesion: same metadata, different photographs
        assert len({tuple((k, v) for k, v in p.items() if k != "image_id") for p in photos}) == 1
        a, b = (np.asarray(Image.open(out / "images" / f"{p['image_id']}.png"), float) for p in photos[:2])
        assert np.abs(a - b).mean() > 1


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    cfg = dict(images_per_class=4, resolution=32)
    make_demo_data(DemoDataConfig(output_dir=str(tmp_path / "a"), seed=1, **cfg))
    make_demo_data(DemoDataConfig(output_dir=str(tmp_path / "b"), seed=1, **cfg))
    make_demo_data(DemoDataConfig(output_dir=str(tmp_path / "c"), seed=2, **cfg))
    a, b, c = (sorted((tmp_path / x / "images").iterdir()) for x in "abc")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    assert (tmp_path / "a" / "metadata.csv").read_bytes() == (tmp_path / "b" / "metadata.csv").read_bytes()
    with Image.open(a[0]) as im:
        assert im.size == (32, 32)


def _lesion(dx: str, **concepts) -> dict:
    row = draw_lesion_row(random.Random(5), dx, "l", "i")
    row.update(
        {n: "absent" for n in labels.CONCEPT_NAMES}, sex="female", localization="lower extremity", skin_tone="light"
    )
    row.update(concepts)
    return row


def _px(row: dict) -> np.ndarray:
    return render(row, 64, lesion_seed=11, image_seed=12, pose=False).astype(float) / 255


@pytest.mark.parametrize("concept", labels.CONCEPTS, ids=lambda c: c.name)
def test_every_concept_value_changes_the_pixels(concept):
    """Captions say a concept is present only when it is drawn: each value alters the same lesion."""
    absent = _px(_lesion("nv"))
    for value in concept.values[1:]:
        present = _px(_lesion("nv", **{concept.name: value}))
        changed = (np.abs(present - absent).max(-1) > 0.08).sum()
        assert changed >= 12, f"{concept.name}={value} changes only {changed} pixels"


def test_concepts_have_their_colours():
    def frac(img, cond):
        return cond(img[..., 0], img[..., 1], img[..., 2]).mean()

    blue = lambda r, g, b: (b > r + 0.1) & (b > 0.5)  # noqa: E731
    red = lambda r, g, b: (r > 0.55) & (g < 0.25) & (b < 0.3)  # noqa: E731
    white = lambda r, g, b: (r > 0.85) & (g > 0.85) & (b > 0.8)  # noqa: E731
    base = _px(_lesion("nv"))
    assert frac(_px(_lesion("nv", blue_whitish_veil="present")), blue) > frac(base, blue) + 0.015
    assert frac(_px(_lesion("nv", vascular_structures="arborizing")), red) > frac(base, red) + 0.005
    assert frac(_px(_lesion("nv", regression_structures="white areas")), white) > frac(base, white) + 0.005


@pytest.mark.parametrize("tone", list(SKIN_LAB))
def test_background_ita_matches_the_skin_tone(tone):
    row = _lesion("df", skin_tone=tone)
    img = render(row, 64, lesion_seed=1, image_seed=2, pose=False)
    lab = rgb2lab(img.astype(float) / 255)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    r = np.hypot(xs - 32, ys - 32) / 32
    ring = (r > 0.8) & (r < 0.98)
    L, b = np.median(lab[..., 0][ring]), np.median(lab[..., 2][ring])
    ita = np.degrees(np.arctan((L - 50) / b))
    assert labels.skin_tone_from_ita(ita) == tone


def test_classes_are_learnable_from_pixels(demo_data):
    """A colour-histogram random forest on held-out lesions beats chance (1/7) by far."""
    out, _ = demo_data
    rows = _rows(out)

    def histogram(path):
        q = (np.asarray(Image.open(path), float) / 255 * 3.999).astype(int)
        return np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64) / 4096

    X = np.stack([histogram(out / "images" / f"{r['image_id']}.png") for r in rows])
    y = np.array([r["dx"] for r in rows])
    test = np.array([int(r["lesion_id"].rsplit("_", 1)[1]) % 4 == 0 for r in rows])  # split by lesion
    clf = RandomForestClassifier(200, random_state=0).fit(X[~test], y[~test])
    assert balanced_accuracy_score(y[test], clf.predict(X[test])) > 0.6


def test_bad_flags_exit_with_one_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--images_per_class", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--images_per_class" in err
    with pytest.raises(InputError, match="--resolution"):
        DemoDataConfig(resolution=8)
    assert not (tmp_path / "x").exists()
