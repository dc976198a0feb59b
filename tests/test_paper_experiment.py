"""experiments/paper_experiment.py run as a user runs it, on a real Derm7pt subset at 32 px with token training."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lesiongen import labels
from lesiongen.classify.models import LAST, read_checkpoint
from lesiongen.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "paper_experiment.py"
# Far too short to learn anything: the test checks plumbing, resumption and the table, not accuracy.
SMOKE = ["--scale", "0.01", "--resolution", "32", "--synthetic_per_class", "2", "--num_inference_steps", "2"]
SMOKE += ["--pairs_per_class", "1", "--guidance_scale", "1.5"]  # the pairs keep --steering_guidance_scale 3
SMOKE += ["--pretrained", "false"]  # no ImageNet weights offline
SMOKE += ["--mixing", "synthetic_weight=0.5", "finetune_epochs=1"]  # a recipe reaches the mixed classifiers


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=900
    )


@pytest.fixture(scope="module")
def d7p_subset_root(tmp_path_factory, d7p_csv: Path, d7p_images: Path) -> Path:
    """A data folder laid out like ../shared/data (d7p/meta/meta.csv, d7p/images) holding ~4 cases per diagnosis."""
    root = tmp_path_factory.mktemp("paper_data")
    (root / "d7p" / "meta").mkdir(parents=True)
    meta = pd.read_csv(d7p_csv)
    imaged = meta[[(d7p_images / str(p)).is_file() for p in meta["derm"]]]
    imaged.groupby("diagnosis", sort=False).head(4).to_csv(root / "d7p" / "meta" / "meta.csv", index=False)
    os.symlink(d7p_images, root / "d7p" / "images")
    return root


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, d7p_subset_root: Path) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("paper") / "run"
    done = run_script("--data", str(d7p_subset_root), "--out", str(out), *SMOKE)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_writes_one_row_per_training_set_and_caption_style(experiment):
    out, _ = experiment
    result = json.loads((out / "results.json").read_text())
    assert [(r["captions"], r["train"]) for r in result["summary"]] == [
        ("-", "real"),
        ("label", "synthetic"),
        ("label", "mixed"),
        ("concept", "synthetic"),
        ("concept", "mixed"),
    ]
    (seed,) = result["replicates"]
    assert seed == json.loads((out / "seed-0" / "results.json").read_text())
    for row, replicate in zip(result["summary"], seed["rows"], strict=True):
        assert row["seeds"] == 1 and row["balanced_accuracy"] == replicate["balanced_accuracy"]
        assert 0.0 <= row["balanced_accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
        assert (row["fid"] is None) == (row["captions"] == "-")
    for style in ("label", "concept"):
        domain = seed["fidelity"][style]["domain"]
        assert domain["fid"] >= 0.0 and domain["kid"] is not None
        manifest = pd.read_csv(out / "seed-0" / "synthetic" / style / "manifest.csv")
        rows = (out / "seed-0" / "data" / style / "train" / "metadata.jsonl").read_text().splitlines()
        real = {json.loads(line)["label"] for line in rows} - {"other"}  # Derm7pt's 'miscellaneous' has no prompt
        # class-balanced: every real training condition, the asked number of images each
        assert manifest["label"].value_counts().to_dict() == {c: 2 for c in real}
        assert set(manifest["guidance_scale"]) == {1.5}
    assert seed["seconds"]["diffusion training (concept)"] > 0
    concept = seed["fidelity"]["concept"]["domain"]
    assert 0 <= concept["recognisability"] <= 1 and concept["recognisability_ratio"] >= 0
    assert concept["veil_effect"] is not None
    # The blue-gray share is measured on the segmented lesion; a 2-step smoke model may draw none to segment.
    veil = json.loads((out / "seed-0" / "evaluation" / "concept" / "evaluation.json").read_text())
    measured = veil["paired_descriptors"]["blue_whitish_veil=present:absent"]
    assert measured["descriptor"] == "blue_gray_pct" and (concept["veil_blue_gray"] is None) == (measured["n"] == 0)
    assert seed["fidelity"]["label"]["domain"]["veil_effect"] is None  # label captions cannot steer a concept
    pairs = pd.read_csv(out / "seed-0" / "pairs" / "concept" / "manifest.csv")
    assert set(pairs["contrast"]) == {"blue_whitish_veil=present:absent", "pigment_network=typical:absent"}
    assert len(pairs) == 2 * 2 * len(real)
    assert set(pairs["guidance_scale"]) == {3.0}
    # each side of a pair is sampled against its partner's prompt (generate.py --contrast_guidance)
    for _, both in pairs.groupby(["pair", "contrast"]):
        a, b = both.to_dict("records")
        assert a["negative_prompt"] == b["text"] != a["text"] == b["negative_prompt"]
    diff = seed["recognisability_difference"]
    assert diff["low"] <= diff["difference"] <= diff["high"]
    # the mixed classifiers trained with the recipe: their one epoch, then one on real images only, which real
    # only gets too; each training set against real only with its interval and the verdict that interval gives
    history = json.loads((out / "seed-0" / "classifiers" / "concept" / "mixed-seed0" / "summary.json").read_text())
    assert [h["stage"] for h in history["history"]] == ["pretrain", "finetune"]
    real_run = json.loads((out / "seed-0" / "classifiers" / "real" / "real-seed0" / "summary.json").read_text())
    assert len(real_run["history"]) == 2
    # by default the mix is two lesion-kept skin-tone variants of each real training image, not the text-to-image set
    anchored = out / "seed-0" / "anchored" / "concept-2x-strength0.5-keep-verylight-light-intermediate-tan-brown-dark"
    variants = pd.read_csv(anchored / "manifest.csv", dtype=str, keep_default_na=False)
    assert variants["source"].str.contains("/concept/train/").all() and variants.groupby("source").size().max() == 2
    assert set(variants["skin_tone"]) <= set(labels.SKIN_TONE_NAMES) and set(variants["strength"]) == {"0.5"}
    mixed = next(r for r in seed["rows"] if (r["train"], r["captions"]) == ("mixed", "concept"))
    assert mixed["n_synthetic"] == (variants["valid"] == "true").sum() > 0
    ba = {d["name"]: d for d in result["differences"] if d["metric"] == "balanced_accuracy"}
    assert set(ba) == {"synthetic-label", "mixed-label", "synthetic-concept", "mixed-concept"}
    by_row = {f"{r['train']}-{r['captions']}": r["balanced_accuracy"] for r in seed["rows"]}
    for name, d in ba.items():
        assert d["difference"] == pytest.approx(by_row[name] - by_row["real--"], abs=1e-5)
        assert d["low"] <= d["difference"] <= d["high"] and d["seeds"] == 1
        assert d["verdict"] == ("better" if d["low"] > 0 else "worse" if d["high"] < 0 else "no difference shown")


def test_prints_the_table_with_stage_times(experiment):
    _, done = experiment
    lines = done.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| captions | train | balanced acc."))
    assert lines[head + 2].startswith("| - | real | ")
    assert lines[head + 6].startswith("| concept | mixed | ")
    assert any(line.startswith("seed 0 stage seconds: ") for line in lines[head:])
    assert any(line.startswith("| mixed-concept | real only | balanced acc. | ") for line in lines[head:])
    assert any(line.startswith("seed 0: recognisability, concept minus label captions") for line in lines[head:])


def test_a_rerun_reuses_finished_stages(experiment, d7p_subset_root):
    out, _ = experiment
    first = json.loads((out / "results.json").read_text())
    weights = out / "seed-0" / "models" / "concept" / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run_script("--data", str(d7p_subset_root), "--out", str(out), *SMOKE)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "results.json").read_text())
    assert weights.stat().st_mtime_ns == stamp
    assert second["summary"] == first["summary"]
    # nothing was redone, so the stage times are still those of the run that did the work
    assert second["replicates"][0]["seconds"] == first["replicates"][0]["seconds"]
    assert "--- generation" not in again.stdout and "--- diffusion training" not in again.stdout


def test_a_rerun_at_other_guidance_refuses_the_sets_it_would_reuse(experiment, d7p_subset_root):
    """Reusing a set sampled at guidance 1.5 under --guidance_scale 2 would put it in the table as if sampled at 2."""
    out, _ = experiment
    before = (out / "results.json").read_bytes()
    done = run_script("--data", str(d7p_subset_root), "--out", str(out), *SMOKE, "--guidance_scale", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert str(out / "seed-0" / "synthetic" / "label") in line and "[1.5]" in line and "[2.0]" in line
    assert (out / "results.json").read_bytes() == before


def test_a_wrong_data_folder_is_a_one_line_error(tmp_path):
    done = run_script("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "nowhere" in done.stderr and "Traceback" not in done.stderr


def test_a_synthetic_ratio_that_is_not_positive_is_a_one_line_error(tmp_path):
    done = run_script("--out", str(tmp_path / "out"), "--synthetic_ratio", "0")
    assert done.returncode == 2
    assert "--synthetic_ratio" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_mixing_pair_that_is_no_option_is_a_one_line_error(tmp_path):
    done = run_script("--out", str(tmp_path / "out"), "--mixing", "synthetic_shares=0.3")
    assert (
        done.returncode == 2 and "--mixing: 'synthetic_shares=0.3' is not name=value of a mixing option" in done.stderr
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_seeds_are_summarised_as_mean_and_spread():
    spec = importlib.util.spec_from_file_location("paper_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)

    def replicate(seed: int, acc: float, fid: float) -> dict:
        metrics = {"macro_f1": acc, "worst_sex": acc, "worst_site_group": None}
        return {
            "seed": seed,
            "rows": [
                {"captions": "-", "train": "real", "balanced_accuracy": 0.5, **metrics},
                {"captions": "concept", "train": "synthetic", "balanced_accuracy": acc, **metrics},
            ],
            "fidelity": {"concept": {"domain": {"fid": fid, "kid": 0.1, "veil_effect": 0.2}}},
            "seconds": {"generation (concept)": 1.0},
        }

    replicates = [replicate(0, 0.2, 100.0), replicate(1, 0.4, 120.0)]
    summary = module.summarise(replicates, "domain")
    real, synthetic = summary
    assert (real["captions"], real["seeds"], real["balanced_accuracy"], real["fid"]) == ("-", 2, 0.5, None)
    assert synthetic["balanced_accuracy"] == pytest.approx(0.3) and synthetic["balanced_accuracy_std"] == pytest.approx(
        0.1
    )
    assert synthetic["fid"] == pytest.approx(110.0) and synthetic["worst_site_group"] is None
    text = module.table(
        {"space": "domain", "config": {"seeds": [0, 1]}, "summary": summary, "replicates": replicates, "machine": {}}
    )
    assert "| concept | synthetic | 0.300 ± 0.100 | " in text
    assert "110.000 ± 10.000" in text and "mean ± std" in text


def test_mixing_recipes_reuse_the_finished_stages_and_train_only_the_classifiers(experiment, tmp_path):
    """experiments/mixing_recipes.py on the finished run: an anchored recipe makes variants of the training images
    once, in the finished seed, and mixes them in; no diffusion stage is redone; one table holds every recipe."""
    out, _ = experiment
    weights = out / "seed-0" / "models" / "concept" / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    recipes = ["anchored:anchored_variants=1,anchored_skin_tones=none,swap_probability=0.5"]
    recipes += ["initsyn:anchored_variants=0,init_from=synthetic"]
    args = ["--from", str(out), "--out", str(tmp_path / "recipes"), "--seeds", "0", "--recipes", *recipes]
    done = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "mixing_recipes.py"), *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert weights.stat().st_mtime_ns == stamp and "--- diffusion training" not in done.stdout
    assert "--- classifier (synthetic" not in done.stdout  # synthetic only takes no recipe: reused
    variants = pd.read_csv(out / "seed-0" / "anchored" / "concept-1x-strength0.5" / "manifest.csv")
    train = pd.read_json(out / "seed-0" / "data" / "concept" / "train" / "metadata.jsonl", lines=True)
    train = train[train["label"].isin(labels.CODES)]  # Derm7pt's 'other' lesions are no class of the classifier
    assert len(variants) == len(train) and variants["source"].map(lambda p: "/train/" in p).all()
    run = tmp_path / "recipes" / "anchored" / "seed-0" / "classifiers" / "concept" / "mixed-seed0"
    mixed = read_checkpoint(run / "last.safetensors")["config"]
    assert Path(mixed["synthetic_dir"]).resolve() == (out / "seed-0" / "anchored" / "concept-1x-strength0.5").resolve()
    assert mixed["swap_probability"] == 0.5
    table = (tmp_path / "recipes" / "recipes.md").read_text()
    assert "| anchored | mixed-concept | real only | balanced acc. | " in table
    # init_from=synthetic: the mix starts from the finished seed's synthetic-only run, linked in, at its last epoch
    run = tmp_path / "recipes" / "initsyn" / "seed-0" / "classifiers" / "concept"
    start = read_checkpoint(run / "mixed-seed0" / "last.safetensors")["config"]["init_from"]
    assert Path(start).resolve() == (out / "seed-0" / "classifiers" / "concept" / "synthetic-seed0" / LAST).resolve()
    assert "| initsyn | mixed-concept | real only | balanced acc. | " in table
    assert set(json.loads((tmp_path / "recipes" / "recipes.json").read_text())) == {"anchored", "initsyn"}


def test_a_recipe_names_its_mixing_options_and_its_anchored_variants(monkeypatch):
    """mixing_recipes.py splits a recipe into classifier mixing pairs and the experiment's anchored settings, and
    variants of another kind go to another folder, so two recipes never share a set made for the other."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location("mixing_recipes", REPO / "experiments" / "mixing_recipes.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    name, pairs, settings = module.parse_recipe(
        "tones:anchored_variants=2,anchored_skin_tones=all,swap_probability=0.5"
    )
    assert (name, pairs) == ("tones", ["swap_probability=0.5"])
    assert settings == {"anchored_variants": 2, "anchored_skin_tones": list(labels.SKIN_TONE_NAMES)}
    assert module.parse_recipe("light:anchored_skin_tones=very light+light")[2] == {
        "anchored_skin_tones": ["very light", "light"]
    }
    assert module.parse_recipe("redrawn:anchored_skin_tones=none")[2] == {"anchored_skin_tones": []}
    with pytest.raises(InputError, match="--recipes"):
        module.parse_recipe(":synthetic_bn=true")
    # what a recipe retrains besides real + synthetic: the yardstick when it fine-tunes, both others when every
    # classifier is tone-augmented
    for text, runs in (("bn:synthetic_bn=true", set()), ("ft:finetune_epochs=5", {"real"})):
        assert module.retrained(*module.parse_recipe(text)[1:]) == runs
    name, pairs, settings = module.parse_recipe("recolour:tone_augment=0.5")
    assert settings == {"tone_augment": 0.5} and module.retrained(pairs, settings) == {"real", "synthetic"}
    experiment = sys.modules["paper_experiment"]
    plain = experiment.PaperConfig(anchored_variants=2, anchored_skin_tones=["none"])
    tones = experiment.PaperConfig(anchored_variants=2, anchored_skin_tones=["dark"])
    assert experiment.anchored_name(plain, "concept") != experiment.anchored_name(tones, "concept")
    # the default: two lesion-kept variants on skin of any tone; 'none' (alone) redraws the whole image
    default = experiment.PaperConfig()
    assert (default.anchored_variants, default.anchored_skin_tones) == (2, list(labels.SKIN_TONE_NAMES))
    assert plain.anchored_skin_tones == [] and experiment.anchored_name(plain, "concept") == "concept-2x-strength0.5"
    with pytest.raises(InputError, match="--anchored_skin_tones: 'none' goes alone"):
        experiment.PaperConfig(anchored_skin_tones=["none", "dark"])
