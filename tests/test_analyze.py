"""The image analyzer against ground truth: PH2 expert masks and colours, Derm7pt expert blue-whitish
veil, drawn disks of known size and colour on skin of known Lab, and images it must refuse to measure."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from builders import oversized_png
from PIL import Image
from skimage import color
from sklearn.metrics import roc_auc_score

from lesiongen import labels
from lesiongen.captions import analyze
from lesiongen.images import read_rgb


@pytest.fixture(scope="session")
def ph2_results(data_root):
    """Every PH2 image analysed once per session, with its Dice against the expert mask."""
    meta = pd.read_csv(data_root / "ph2" / "meta.csv")
    results = []
    for image_id in meta["image_id"]:
        result = analyze.analyze_image(read_rgb(data_root / "ph2" / "images" / f"{image_id}.jpg"))
        truth = np.asarray(Image.open(data_root / "ph2" / "masks" / f"{image_id}.png").convert("L")) >= 128
        assert result["mask"].shape == truth.shape  # the mask comes back at the input's size
        result["dice"] = 2 * (result["mask"] & truth).sum() / (result["mask"].sum() + truth.sum())
        results.append(result)
    return meta, results


@pytest.fixture(scope="session")
def d7p_valid_results(data_root, d7p_csv):
    """The Derm7pt official valid split (the thresholds were calibrated on train) analysed once."""
    meta = pd.read_csv(d7p_csv)
    valid = pd.read_csv(data_root / "d7p" / "meta" / "valid_indexes.csv").iloc[:, 0]
    rows = meta.loc[sorted(valid)]
    rows = rows[[(data_root / "d7p" / "images" / p).is_file() for p in rows["derm"]]]
    results = [analyze.analyze_image(read_rgb(data_root / "d7p" / "images" / p)) for p in rows["derm"]]
    return rows, results


def _auc(labels_, scores) -> float:
    scores = np.array([np.nan if s is None else s for s in scores], float)
    keep = ~np.isnan(scores)
    return roc_auc_score(np.asarray(labels_)[keep], scores[keep])


def test_ph2_masks_match_expert_segmentation(ph2_results):
    _, results = ph2_results
    dice = np.array([r["dice"] for r in results])
    assert sum(r["mask_ok"] for r in results) >= 97
    assert dice.mean() >= 0.85, f"mean Dice {dice.mean():.3f}"
    assert np.median(dice) >= 0.9


def test_ph2_blue_gray_and_asymmetry_separate_expert_labels(ph2_results):
    meta, results = ph2_results
    blue_gray = _auc(meta["blue_gray"] == 1, [r["colors"]["blue_gray"] if r["mask_ok"] else None for r in results])
    asymmetry = _auc(meta["asymmetry"] > 0, [r["shape_asymmetry"] for r in results])
    assert blue_gray >= 0.8, f"blue-gray AUC {blue_gray:.3f}"
    assert asymmetry >= 0.7, f"asymmetry AUC {asymmetry:.3f}"


def test_d7p_valid_blue_gray_separates_blue_whitish_veil(d7p_valid_results):
    rows, results = d7p_valid_results
    assert len(rows) >= 200
    auc = _auc(rows["blue_whitish_veil"] == "present", [r["blue_gray_pct"] for r in results])
    assert auc >= 0.72, f"veil AUC {auc:.3f}"
    for r in results:
        assert set(analyze.measured_only(r)) == set(analyze.MEASURED_KEYS)
        if r["mask_ok"]:
            assert abs(sum(r["colors"].values()) - 1.0) < 1e-3
            assert r["skin_tone"] == labels.skin_tone_from_ita(r["ita"])


def lab_to_rgb8(lab: tuple[float, float, float]) -> np.ndarray:
    rgb = color.lab2rgb(np.array(lab, float).reshape(1, 1, 3))[0, 0]
    return np.round(rgb * 255).astype(np.uint8)


def draw_disk(shape, centre, radius, lesion_rgb, skin_lab, seed=0) -> np.ndarray:
    """A lesion-like disk on uniform skin of known Lab, with a little sensor noise."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    img = np.empty((h, w, 3), float)
    img[:] = lab_to_rgb8(skin_lab)
    img[inside] = lesion_rgb
    img += np.random.default_rng(seed).normal(0, 2.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def expected_ita(lab) -> float:
    return math.degrees(math.atan((lab[0] - 50) / lab[2]))


@pytest.mark.parametrize(
    "shape, centre, radius, lesion_rgb, colour, skin_lab",
    [
        ((450, 600), (225, 300), 110, (120, 70, 45), "dark_brown", (72, 10, 16)),  # light skin, ITA 54
        ((300, 200), (160, 95), 55, (105, 108, 145), "blue_gray", (80, 6, 14)),  # very light, ITA 65
        ((256, 256), (120, 140), 70, (35, 28, 30), "black", (55, 12, 22)),  # tan, ITA 12.8
        ((384, 256), (200, 128), 80, (190, 130, 85), "light_brown", (85, 4, 9)),  # very light, ITA 75.6
        ((400, 400), (200, 200), 90, (60, 40, 40), "black", (40, 10, 20)),  # brown, ITA -26.6
    ],
)
def test_drawn_disk_area_colour_and_skin_tone(shape, centre, radius, lesion_rgb, colour, skin_lab):
    img = draw_disk(shape, centre, radius, lesion_rgb, skin_lab)
    r = analyze.analyze_image(img)
    assert r["mask_ok"], r["problem"]
    assert r["mask"].shape == shape
    true_pct = 100 * math.pi * radius**2 / (shape[0] * shape[1])
    assert abs(r["area_pct"] - true_pct) <= 0.1 * true_pct, (r["area_pct"], true_pct)
    assert max(r["colors"], key=r["colors"].get) == colour, r["colors"]
    assert r["skin_tone"] == labels.skin_tone_from_ita(expected_ita(skin_lab))
    assert abs(r["ita"] - expected_ita(skin_lab)) < 2.0
    assert r["shape_asymmetry"] < 0.1
    assert r["cut_off"] is False


def test_lesion_cut_off_by_the_frame_is_reported():
    img = draw_disk((300, 300), (150, 270), 90, (110, 65, 40), (75, 8, 15))
    r = analyze.analyze_image(img)
    assert r["mask_ok"] and r["cut_off"] is True
    assert r["shape_asymmetry"] > 0.1  # a disk cut by the frame is no longer symmetric


@pytest.mark.parametrize("lab", [(70, 8, 15), (55, 12, 25), (40, 10, 20), (85, 3, 10), (62, 15, 30)])
def test_ita_of_uniform_patch_within_one_degree(lab):
    patch = np.broadcast_to(lab_to_rgb8(lab), (40, 40, 3))
    assert abs(analyze.skin_ita(patch) - expected_ita(lab)) < 1.0


def test_ita_is_unknown_without_yellow():
    assert analyze.ita_degrees(60.0, 0.0) is None
    assert analyze.ita_degrees(60.0, -3.0) is None
    assert labels.skin_tone_from_ita(analyze.ita_degrees(60.0, -3.0)) == "unknown"


def _bad_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    disk = draw_disk((256, 256), (128, 128), 70, (110, 65, 40), (75, 8, 15))
    return {
        "grayscale 3-channel": np.repeat(disk.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2),
        "grayscale 2-D": disk.mean(axis=2).astype(np.uint8),
        "tiny": disk[:20, :20],
        "all black": np.zeros((256, 256, 3), np.uint8),
        "uniform skin": draw_disk((256, 256), (0, 0), 0, (0, 0, 0), (75, 8, 15)),
        "lesion fills the frame": draw_disk((256, 256), (128, 128), 250, (110, 65, 40), (75, 8, 15)),
        "noise": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        "noise at a generator's 64 px": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "empty": np.zeros((0, 0, 3), np.uint8),
    }


@pytest.mark.parametrize("name", list(_bad_images()))
def test_unmeasurable_images_make_no_claims(name):
    r = analyze.analyze_image(_bad_images()[name])
    assert r["mask_ok"] is False and r["problem"]
    measured = analyze.measured_only(r)
    assert measured == analyze.empty_measurement()
    assert json.dumps(measured)


def test_float_and_rgba_inputs_are_accepted():
    disk = draw_disk((200, 200), (100, 100), 50, (110, 65, 40), (75, 8, 15))
    as_float = analyze.analyze_image(disk.astype(np.float32) / 255.0)
    rgba = analyze.analyze_image(np.concatenate([disk, np.full((200, 200, 1), 255, np.uint8)], axis=2))
    plain = analyze.analyze_image(disk)
    assert as_float["mask_ok"] and rgba["mask_ok"]
    assert abs(as_float["area_pct"] - plain["area_pct"]) < 0.5 and rgba["area_pct"] == plain["area_pct"]


def test_cli_writes_measured_masks_and_contact_sheet(tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(draw_disk((300, 400), (150, 200), 80, (120, 70, 45), (72, 10, 16))).save(images / "a.png")
    Image.fromarray(draw_disk((256, 256), (128, 128), 60, (105, 108, 145), (80, 6, 14))).save(images / "sub" / "b.jpg")
    Image.fromarray(np.full((64, 64), 120, np.uint8)).save(images / "gray.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert analyze.main(["--images", str(images), "--out", str(out)]) == 0
    rows = {r["file_name"]: r for r in map(json.loads, (out / "measured.jsonl").read_text().splitlines())}
    assert set(rows) == {"a.png", "sub/b.jpg", "gray.png", "broken.jpg"}
    assert all(list(r) == ["file_name", *analyze.MEASURED_KEYS] for r in rows.values())
    assert rows["a.png"]["mask_ok"] and rows["sub/b.jpg"]["mask_ok"]
    assert not rows["gray.png"]["mask_ok"] and not rows["broken.jpg"]["mask_ok"]
    mask = np.asarray(Image.open(out / "masks" / "a.png"))
    assert mask.shape == (300, 400) and set(np.unique(mask)) == {0, 255}
    assert (out / "masks" / "b.png").is_file() and not (out / "masks" / "gray.png").exists()
    assert Image.open(out / "contact_sheet.png").size[0] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["mask_ok"] == 2
    assert "2 with a usable mask" in capsys.readouterr().out


def test_transparent_pixels_are_not_measured(tmp_path):
    """A lesion hidden under alpha 0 is not there to see: it must not be measured as if opaque."""
    disk = draw_disk((256, 256), (128, 128), 60, (110, 65, 40), (75, 8, 15))
    hidden = analyze.analyze_image(np.dstack([disk, np.zeros((256, 256), np.uint8)]))
    assert hidden["mask_ok"] is False and "transparent" in hidden["problem"]
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.dstack([disk, np.zeros((256, 256), np.uint8)]), "RGBA").save(images / "hidden.png")
    alpha = np.full((256, 256), 255, np.uint8)
    alpha[:, 200:] = 0  # a transparent strip at the right is neither skin nor lesion
    Image.fromarray(np.dstack([disk, alpha]), "RGBA").save(images / "strip.png")
    Image.fromarray(disk).save(images / "opaque.png")
    assert analyze.main(["--images", str(images), "--out", str(tmp_path / "out")]) == 0
    rows = {r["file_name"]: r for r in map(json.loads, (tmp_path / "out" / "measured.jsonl").read_text().splitlines())}
    assert not rows["hidden.png"]["mask_ok"]
    assert rows["strip.png"]["mask_ok"] and rows["strip.png"]["area_pct"] == rows["opaque.png"]["area_pct"]


def test_cli_counts_an_oversized_image_and_writes_the_rest(tmp_path, capsys):
    images = tmp_path / "images"
    oversized_png(images / "huge.png")
    Image.fromarray(draw_disk((256, 256), (128, 128), 60, (110, 65, 40), (75, 8, 15))).save(images / "ok.png")
    assert analyze.main(["--images", str(images), "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "measured.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r["mask_ok"]) for r in rows] == [("huge.png", False), ("ok.png", True)]
    assert "1 unreadable image" in capsys.readouterr().out


def test_cli_missing_folder_is_one_line_error(tmp_path, capsys):
    assert analyze.main(["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    (tmp_path / "a.png").write_bytes(b"")
    assert analyze.main(["--images", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert "a.png: is a file, not an image folder" in capsys.readouterr().err
    # --limit -1 sliced off the last image and reported success
    assert analyze.main(["--images", str(tmp_path), "--out", str(tmp_path / "o"), "--limit", "-1"]) == 2
    assert "--limit: must be at least 1, got -1" in capsys.readouterr().err


def test_calibrated_claims_beat_the_base_rate_on_d7p_valid(d7p_valid_results):
    """reports.CLAIMS thresholds were chosen on Derm7pt train; on valid each claim must be informative."""
    from lesiongen.captions import reports

    rows, results = d7p_valid_results
    for claim in reports.CLAIMS:
        truth = rows.apply(reports.EXPERT_TARGETS[claim.target], axis=1).to_numpy(bool)
        ok = np.array([r["mask_ok"] for r in results])
        said = np.array([claim.holds(analyze.measured_only(r)) for r in results])
        assert said.sum() >= 10, claim.name
        assert truth[said].mean() >= truth[ok].mean() + 0.1, (claim.name, truth[said].mean(), truth[ok].mean())


def test_pink_lesion_on_darker_skin_uses_the_colour_distance_fallback():
    """A pink lesion is not darker than the skin in the blue channel; the skin-distance fallback finds it."""
    skin = (55, 12, 22)  # tan, ITA 12.8
    img = draw_disk((300, 300), (150, 150), 70, (225, 160, 170), skin)
    r = analyze.analyze_image(img)
    assert r["mask_ok"], r["problem"]
    true_pct = 100 * math.pi * 70**2 / 300**2
    assert abs(r["area_pct"] - true_pct) <= 0.1 * true_pct
    assert r["skin_tone"] == "tan"


def test_measure_files_in_two_processes_gives_the_serial_measurements_and_errors(data_root, tmp_path):
    """The analyzer's process pool (build_captions and evaluate use it) keeps the order and every value, and a
    worker's unreadable image reaches the caller as the same one-line error naming the file."""
    from lesiongen.images import UnreadableImage

    paths = sorted((data_root / "ph2" / "images").glob("*.jpg"))[:9]
    serial = analyze.measure_files(paths, workers=1)
    assert analyze.measure_files(paths, workers=2) == serial
    assert [r["mask_ok"] for r in serial].count(True) >= 7 and len({r["area_pct"] for r in serial}) == 9
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImage, match="broken.jpg: cannot read image") as raised:
        analyze.measure_files([*paths, broken], workers=2)
    assert raised.value.where == str(broken) and raised.value.reason
    with pytest.raises(Exception, match="--analysis_workers: must be >= 0"):
        analyze.analysis_workers(-1)
    assert analyze.analysis_workers(0) >= 1 and analyze.analysis_workers(3) == 3
