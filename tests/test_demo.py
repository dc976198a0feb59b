"""The quick demo end to end (``make demo-quick``), once per test run, and every artefact it leaves."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from lesiongen import labels
from lesiongen.classify.compare import verdict_text
from lesiongen.classify.metrics import verdict
from lesiongen.demo.report import COMPARISON_COLUMNS, RERUN_COMMANDS
from lesiongen.demo.run import (
    CONTRASTS,
    DEMO_ATTENTION_HEADS,
    SETTINGS,
    STAGES,
    DemoConfig,
    demo,
    idle_cores,
    read_cpu_times,
    thread_count,
)
from lesiongen.demo.run import DemoConfig as Config
from lesiongen.diffusion.train_vae import vae_loss


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory, installed_venv) -> Path:
    """``lesiongen-demo --quick`` as a user runs it after ``pip install .``: the installed script, from another folder."""
    work = tmp_path_factory.mktemp("demo")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"}
    script = installed_venv / "bin" / "lesiongen-demo"
    done = subprocess.run(
        # one thread, as the rest of the suite: the default (one per idle core) would depend on the machine's load
        [script, "--quick", "--out", "demo_output", "--threads", "1"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "demo_output"


def test_every_stage_finished_with_a_marker(quick_demo):
    for stage in STAGES:
        marker = json.loads((quick_demo / ".stages" / f"{stage.key}.json").read_text())
        assert marker["summary"] and math.isfinite(marker["seconds"]) and marker["seconds"] >= 0
    times = json.loads((quick_demo / "stage_times.json").read_text())
    assert len(times) == len(STAGES) and all(math.isfinite(v) for v in times.values())


def test_data_captions_and_model_artefacts(quick_demo):
    s = SETTINGS["quick"]
    images = sorted((quick_demo / "data" / "images").glob("*.png"))
    assert len(images) >= 7 * 4
    for path in images[:10]:
        with Image.open(path) as im:
            im.load()
            assert im.size == (s.resolution, s.resolution)
    for split in ("train", "validation", "test"):
        rows = [
            json.loads(line) for line in (quick_demo / "captions" / split / "metadata.jsonl").read_text().splitlines()
        ]
        assert rows and all(r["text"] and r["concept_source"] == "metadata" for r in rows)
    vae = json.loads((quick_demo / "model" / "tiny" / "vae" / "train_vae.json").read_text())
    assert vae["final_loss"] < vae["first_loss"]
    config = json.loads((quick_demo / "model" / "tiny" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(vae["scaling_factor"]) and config["scaling_factor"] > 0
    assert (quick_demo / "model" / "base" / "model_index.json").is_file()
    assert (quick_demo / "model" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    base, lora = (
        json.loads((quick_demo / "model" / m / "config.json").read_text())["config"] for m in ("base", "lora")
    )
    assert base["tag_dropout"] == s.tag_dropout > 0 and base["use_ema"] and base["train_text_encoder"]
    assert lora["tag_dropout"] == 0  # its frozen text encoder's captions are cached
    unet = json.loads((quick_demo / "model" / "base" / "unet" / "config.json").read_text())
    assert unet["attention_head_dim"] == list(DEMO_ATTENTION_HEADS)


def test_generated_images_are_balanced_and_decode(quick_demo):
    s = SETTINGS["quick"]
    lines = (quick_demo / "generated" / "manifest.csv").read_text().splitlines()
    import csv

    rows = list(csv.DictReader(lines))
    assert len(rows) == s.images_per_condition * len(labels.CONDITIONS)
    assert {r["label"] for r in rows} == set(labels.CODES)
    for r in rows[:: s.images_per_condition]:
        with Image.open(quick_demo / "generated" / r["file_name"]) as im:
            im.load()
            assert im.size == (s.resolution, s.resolution)


def test_the_mixed_classifier_adds_lesion_kept_variants_of_the_training_images(quick_demo):
    """Real + synthetic trains on the real images plus two variants of each real training image, the lesion kept
    and the skin redrawn in a drawn tone; synthetic only keeps the text-to-image set."""
    variants = pd.read_csv(quick_demo / "variants" / "manifest.csv", dtype=str, keep_default_na=False)
    train_images = {p.name for p in (quick_demo / "captions" / "train" / "images").iterdir()}
    assert len(variants) and all(Path(s).parent.parent.name == "train" for s in variants["source"])
    assert set(variants["source"].map(lambda s: Path(s).name)) <= train_images
    assert variants.groupby("source").size().max() == 2 and len(variants) > len(train_images)
    assert set(variants["skin_tone"]) <= set(labels.SKIN_TONE_NAMES) and len(set(variants["skin_tone"])) > 1
    assert set(variants["strength"]) == {"0.6"} and set(variants["valid"]) <= {"true", "false"}
    results = json.loads((quick_demo / "classifiers" / "comparison.json").read_text())
    n = {r["train"]: (r["n_real"], r["n_synthetic"]) for r in results["runs"]}
    generated = pd.read_csv(quick_demo / "generated" / "manifest.csv")
    assert n["mixed"] == (n["real"][0], int((variants["valid"] == "true").sum())) and n["synthetic"][1] == len(
        generated
    )
    assert Path(results["mixed_dir"]).name == "variants"
    md = (quick_demo / "report.md").read_text()
    assert f"The real + synthetic row adds the images of {results['mixed_dir']}" in md
    # the yardstick trains as many optimiser steps as the mix, so more epochs, and the report says so
    steps = {r["train"]: (r["epochs"], r["steps"]) for r in results["runs"]}
    assert results["real_schedule"] == "steps" and steps["real"][1] >= steps["mixed"][1]
    assert steps["real"][0] > steps["mixed"][0] == steps["synthetic"][0]
    assert f"seed 0: {steps['real'][0]} epochs, {steps['real'][1]} steps against {steps['mixed'][1]}." in md
    valid = variants[variants["valid"] == "true"]
    assert f"{len(valid)} variants of {valid['source'].nunique()} real training images" in md
    with Image.open(quick_demo / "report_files" / "variants.png") as grid:  # a row per condition: source + 2 variants
        assert grid.size[0] == 3 * 64 and grid.size[1] > len(labels.CODES) * 64


def test_report_has_grids_table_losses_and_commands(quick_demo):
    html = (quick_demo / "report.html").read_text()
    md = (quick_demo / "report.md").read_text()
    for cond in labels.CONDITIONS:
        with Image.open(quick_demo / "report_files" / f"grid_{cond.code}.png") as grid:
            assert grid.size == (8 * 64, 2 * 64)
        assert cond.name in html and cond.name in md
    with Image.open(quick_demo / "report_files" / "loss.png") as loss:
        assert loss.size[0] > 300
    # self-contained: every image is a data URI, nothing points at a file
    srcs = re.findall(r"src='([^']*)'", html)
    # grids, confusion matrix, the generated images closest to training images, pair grids, loss, the variants of
    # training images, the audit's grid and flip chart
    figures = len(labels.CONDITIONS) + 1 + 1 + len(CONTRASTS) + 1 + 1 + 2
    assert len(srcs) == figures and all(s.startswith("data:image/png;base64,") for s in srcs)
    audit = json.loads((quick_demo / "audit" / "audit.json").read_text())  # stage 6b, on the test split
    assert audit["config"]["values"] == ["very light", "dark"] and audit["counts"]["sources"] > 0
    assert f"{audit['counts']['valid']} valid and scored" in md and "Counterfactual skin-tone audit" in html
    results = json.loads((quick_demo / "classifiers" / "comparison.json").read_text())
    assert results["split"] == "test" and results["checkpoint"] == "best"
    assert [r["name"] for r in results["runs"]] == ["real only", "synthetic only", "real + synthetic"]
    for row in results["runs"]:
        for key in ("balanced_accuracy", "accuracy", "macro_f1", "worst_group_accuracy"):
            assert math.isfinite(row[key]) and 0 <= row[key] <= 1
        n_train = row["n_real"] + row["n_synthetic"]
        assert f"| {row['name']} | {n_train} | {row['balanced_accuracy']:.3f} |" in md
    header = "| " + " | ".join(title for _, title in COMPARISON_COLUMNS) + " |"
    assert header in md
    # real + synthetic against real only: the difference, its interval and the verdict the interval gives
    mixed = next(
        d for d in results["differences"] if d["name"] == "real + synthetic" and d["metric"] == "balanced_accuracy"
    )
    assert mixed["verdict"] == verdict(mixed["low"], mixed["high"]) and mixed["n_images"] == results["n_eval"]
    cells = [f"{mixed['difference']:+.3f}", f"[{mixed['low']:+.3f}, {mixed['high']:+.3f}]", verdict_text(mixed)]
    assert "| real + synthetic | real only | balanced acc. | " + " | ".join(cells) + " |" in md
    for _, command in RERUN_COMMANDS:
        assert command in md
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in html


def test_faithfulness_is_measured_and_shown(quick_demo):
    """Recognisability of every condition and a paired effect per switch, in evaluation.json and the report."""
    result = json.loads((quick_demo / "evaluation" / "evaluation.json").read_text())
    rec = result["recognisability"]
    assert set(rec["recall"]) == set(labels.CODES) and rec["real_balanced_accuracy"] is not None
    assert rec["ratio"] == pytest.approx(rec["balanced_accuracy"] / rec["real_balanced_accuracy"])
    ceiling = rec["vae_ceiling"]  # the demo VAE's reconstructions of the same held-out reals
    assert ceiling["n"] == rec["n_heldout_real"] and 0 <= ceiling["balanced_accuracy"] <= 1
    assert ceiling["ratio"] == pytest.approx(ceiling["balanced_accuracy"] / rec["real_balanced_accuracy"])
    s = SETTINGS["quick"]
    assert result["pairs"]["per_contrast"] == {
        c: s.pairs_per_condition * len(labels.CODES) for c in result["pairs"]["per_contrast"]
    } and len(result["pairs"]["per_contrast"]) == len(CONTRASTS)
    for effect in result["spaces"]["domain"]["paired_probe"].values():
        assert effect["n"] == s.pairs_per_condition * len(labels.CODES) and math.isfinite(effect["mean"])
    skin = [e for key, e in result["paired_descriptors"].items() if key.startswith("skin_tone=")]
    effects = [*result["spaces"]["domain"]["paired_probe"].values(), *skin]
    assert len(effects) == len(CONTRASTS)
    marker = json.loads((quick_demo / ".stages" / "faithfulness.json").read_text())
    moved = sum(e["low"] is not None and e["low"] > 0 for e in effects)
    assert f"; {moved} of {len(CONTRASTS)} switches move" in marker["summary"]
    md = (quick_demo / "report.md").read_text()
    assert "of its generated images" in md and "The ceiling" in md
    # the demo's prompts leave the skin tone out, so no band was asked and the section has nothing to show
    assert ("## Skin tone: asked vs measured" in md) == bool(result["attributes"]["skin_tone"])
    for i, contrast in enumerate(result["pairs"]["per_contrast"]):
        field = contrast.partition("=")[0]
        with Image.open(quick_demo / "report_files" / f"pairs_{i}_{field}.png") as grid:
            assert grid.size == (min(8, s.pairs_per_condition * len(labels.CODES)) * 64, 2 * 64)


def test_the_report_says_where_its_numbers_come_from(quick_demo):
    """Commit, thread count, torch and diffusers versions and seed, per stage, in both pages."""
    from importlib.metadata import version

    import lesiongen.demo.run as demo_run

    info = json.loads((quick_demo / demo_run.RUN_INFO).read_text())
    assert info["seed"] == 0 and info["demo"] == "quick"
    assert [(x["number"], x["title"]) for x in info["stages"]] == [(st.number, st.title) for st in STAGES]
    # the quick demo runs from the installed wheel, which knows its version but no commit
    installed = demo_run.INSTALLED.format(version("lesiongen"))
    commit = demo_run.git_commit().split()[0]  # this checkout's, for a demo run from it
    for stage in info["stages"]:
        r = stage["run"]
        assert r["commit"] == installed or re.fullmatch(r"[0-9a-f]{12}( with uncommitted changes)?", r["commit"])
        assert r["commit"] in (installed, commit) or r["commit"].endswith("with uncommitted changes")
        assert r["threads"] == 1  # as the fixture asked
        assert r["torch"] == version("torch") and r["diffusers"] == version("diffusers")
    md = (quick_demo / "report.md").read_text()
    html = (quick_demo / "report.html").read_text()
    assert "Seed 0 for the data, the models and every stage (quick demo)" in md
    table = md.split("## Where these numbers come from")[1].split("\n## ")[0]
    for stage in info["stages"]:
        r = stage["run"]
        cells = f"| {r['commit']} | {r['threads']} | {r['torch']} | {r['diffusers']} | {r['started']} |"
        rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines() if line.endswith(cells)]
        assert len(rows) == 1 and (rows[0] == "every stage" or stage["number"] in rows[0].split(", "))
        assert f"<td>{r['commit']}</td>" in html
    assert f"| {STAGES[0].number} {STAGES[0].title} |" in md  # the stage times name the same numbers


def test_the_report_shows_fidelity_and_near_copies(quick_demo):
    result = json.loads((quick_demo / "evaluation" / "evaluation.json").read_text())
    space = result["spaces"]["domain"]
    overall, memo = space["overall"], space["memorisation"]
    md = (quick_demo / "report.md").read_text()
    assert "## Fidelity and near-copies of training images" in md
    header = "| features | condition | real | generated | FID | KID | precision | recall | density | coverage |"
    assert header in md
    cells = [f"{overall['fid']:.1f}", f"{overall['kid']:.4f}"]
    cells += [f"{overall[k]:.3f}" for k in ("precision", "recall", "density", "coverage")]
    row = f"| domain | all conditions | {overall['n_real']} | {overall['n_synthetic']} | " + " | ".join(cells) + " |"
    assert row in md
    for code in space["per_condition"]:
        assert f"| domain | {labels.BY_CODE[code].name} |" in md
    said = f"Near-copies (domain features): {memo['flagged']} of {overall['n_synthetic']} generated images"
    assert said in md
    with Image.open(quick_demo / "report_files" / "closest_domain.png") as grid:
        assert grid.size == (len(memo["closest"]) * 64, 2 * 64)


def test_steering_effects_are_said_in_words_without_marks(quick_demo):
    md = (quick_demo / "report.md").read_text()
    captions = [line for line in md.splitlines() if line.startswith("**") and "paired effect" in line]
    assert len(captions) == len(CONTRASTS)
    for line in captions:
        assert "-0.000" not in line and " *" not in line.replace("**", "")
        assert line.count(": an effect, the interval") + line.count(": no effect shown") == line.count("(n=")


@pytest.mark.parametrize(
    ("effect", "digits", "said"),
    [
        (
            {"mean": -1e-5, "low": -2e-4, "high": -1e-5, "excludes_zero": True, "n": 42},
            3,
            "0.000 [0.000, 0.000] (n=42): no effect shown, the interval includes 0",
        ),
        ({"mean": 0.109, "low": 0.056, "high": 0.168, "n": 42}, 3, "+0.109 [0.056, 0.168] (n=42): an effect, the interval above 0"),
        ({"mean": -7.9, "low": -16.8, "high": 0.3, "n": 42}, 1, "-7.9 [-16.8, 0.3] (n=42): no effect shown, the interval includes 0"),
        ({"mean": -0.06, "low": -0.118, "high": -0.004, "n": 42}, 3, "-0.060 [-0.118, -0.004] (n=42): an effect, the interval below 0"),
        ({"mean": 0.5, "low": None, "high": None, "n": 1}, 3, "+0.500 (n=1, too few pairs for an interval): no effect shown"),
    ],
)  # fmt: skip
def test_an_effect_is_said_in_words_and_never_marked_on_zero(effect, digits, said):
    from lesiongen.demo.report import effect_words

    assert effect_words(effect, digits) == said


def test_a_report_drops_the_sections_it_has_nothing_for(quick_demo, tmp_path):
    from lesiongen.demo.report import ReportConfig, build_report

    build_report(ReportConfig(output_dir=str(tmp_path), real_data=str(quick_demo / "captions")))
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    title = "Rerun each stage on real data with real Stable Diffusion weights"
    assert re.findall(r"^## (.*)$", md, re.M) == re.findall(r"<h2>(.*?)</h2>", html) == [title]
    assert "No generated images" not in md and "Not measured" not in md


def test_the_training_set_is_sampled_at_its_guidance_and_the_pairs_at_theirs(quick_demo):
    """Low guidance covers more of each condition for training; the pairs need the stronger one to show a switch."""
    s = SETTINGS["quick"]
    assert s.guidance_scale < s.steering_guidance_scale
    for folder, guidance in (("generated", s.guidance_scale), ("pairs", s.steering_guidance_scale)):
        manifest = pd.read_csv(quick_demo / folder / "manifest.csv")
        assert len(manifest) and set(manifest["guidance_scale"]) == {guidance}


def test_rerun_reuses_finished_stages(quick_demo, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (quick_demo / ".stages").iterdir()}
    done = demo(Config(output_dir=str(quick_demo), quick=True))
    printed = capsys.readouterr().out
    assert printed.count(": reused (") == len(STAGES) - 1  # the report is always rewritten
    after = {p.name: p.stat().st_mtime_ns for p in (quick_demo / ".stages").iterdir()}
    assert all(after[k] == before[k] for k in before if k != "report.json")
    assert set(done) == {s.key for s in STAGES}


def test_a_generated_folder_of_other_settings_is_replaced_and_a_killed_one_resumed(quick_demo, tmp_path):
    """The demo owns its folders: after an upgrade changes its settings, the redone stages replace what an
    earlier version generated (generate.py alone refuses to mix settings); a killed run's images are kept."""
    from lesiongen.demo.run import generate_here, generation

    out = tmp_path / "demo"
    shutil.copytree(quick_demo, out)
    s = SETTINGS["quick"]
    bigger = generation(
        Config(output_dir=str(out)),
        s,
        out,
        steering=False,
        num_images=s.images_per_condition + 1,
        output_dir=str(out / "generated"),
    )
    result = generate_here(bigger)
    assert result.planned == result.generated == 7 * (s.images_per_condition + 1) and result.already_done == 0
    rows = (out / "generated" / "manifest.csv").read_text().splitlines()
    kept = out / "generated" / rows[1].split(",")[rows[0].split(",").index("file_name")]
    kept_mtime = kept.stat().st_mtime_ns
    (out / "generated" / "manifest.csv").write_text("\n".join(rows[:-3]) + "\n")  # killed before the last three
    again = generate_here(bigger)
    assert again.already_done == result.planned - 3 and again.generated == 3
    assert kept.stat().st_mtime_ns == kept_mtime


@pytest.mark.parametrize(
    ("cores", "busy", "expected"), [(2, 0.1, 2), (2, 0.5, 2), (2, 1.2, 1), (2, 2.0, 1), (8, 2.0, 6)]
)
def test_threads_0_follow_idle_cores(monkeypatch, cores, busy, expected):
    """--threads 0 leaves busy cores alone: oversubscribing a busy 2-core machine cost 5-10x."""
    ticks = iter([(1000, 2000), (1000 + round(100 * (1 - busy / cores)), 2100)])  # idle, total: before and after
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    monkeypatch.setattr("lesiongen.demo.run.read_cpu_times", lambda: next(ticks))
    monkeypatch.setattr("os.getloadavg", lambda: (cores, cores, cores))  # a stale load average is not read
    monkeypatch.setattr("time.sleep", lambda seconds: None)
    assert idle_cores() == expected


def test_the_default_thread_count_is_the_same_on_a_busy_machine(monkeypatch):
    """A default that followed the load chose 1 thread instead of 2 on a busy machine and changed the demo's
    verdicts: the default is fixed, and only --threads 0 reads the load."""
    monkeypatch.setattr("lesiongen.demo.run.busy_cores", lambda: 2.0)
    assert thread_count(DemoConfig()) == 2 and thread_count(DemoConfig(threads=1)) == 1
    assert thread_count(DemoConfig(threads=0)) == 1


def test_without_proc_stat_the_load_average_counts(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr("lesiongen.demo.run.read_cpu_times", lambda: None)
    monkeypatch.setattr("os.getloadavg", lambda: (2.6, 1.0, 1.0))
    assert idle_cores() == 1


def test_cpu_times_are_read_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 50 2 25 400 10 0 1 1 0 0\n")
    assert read_cpu_times(str(stat)) == (820, 981)
    assert read_cpu_times(str(tmp_path / "missing")) is None


def test_colour_term_separates_blue_from_brown():
    """The VAE loss must punish a brown reconstruction of a blue lesion more than pixel L1 alone does."""
    blue = torch.tensor([-0.2, 0.1, 0.7]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    brown = torch.tensor([0.1, -0.2, -0.5]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    grey = blue.mean(1, keepdim=True).expand(1, 3, 16, 16)
    kl = torch.tensor(0.0)
    _, to_brown = vae_loss(brown, blue, kl, 0.0, 1.0)
    _, to_grey = vae_loss(grey, blue, kl, 0.0, 1.0)
    _, exact = vae_loss(blue, blue, kl, 0.0, 1.0)
    assert exact["colour"] == 0 and exact["l1"] == 0
    assert to_brown["colour"] > to_brown["l1"] and to_grey["colour"] > 0


def test_report_cli_rejects_bad_flags(tmp_path, capsys):
    from lesiongen.demo.report import main as report_main

    assert report_main(["--out", str(tmp_path), "--real_data", str(tmp_path), "--train_runs", "nodir"]) == 2
    assert "--train_runs: 'nodir' is not NAME=DIR" in capsys.readouterr().err
    assert report_main(["--out", str(tmp_path), "--real_data", str(tmp_path / "missing")]) == 2
    assert "missing: not found" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def recording_stages(keys: tuple[str, ...], ran: list[str]) -> tuple:
    """Stand-in stages that only append their key to ``ran`` when they run."""
    import lesiongen.demo.run as demo_run

    return tuple(demo_run.Stage(k, k, k, lambda cfg, s, out, k=k: ran.append(k) or f"{k} done") for k in keys)


def test_changed_switches_redo_only_the_pairs_stage(monkeypatch, tmp_path, capsys):
    """An upgrade that changes the steering switches must not reuse pairs sampled for the old ones, nor retrain."""
    import lesiongen.demo.run as demo_run

    ran: list[str] = []
    monkeypatch.setattr(demo_run, "STAGES", recording_stages(("generate", "faithfulness"), ran))
    cfg = Config(output_dir=str(tmp_path), quick=True)
    demo_run.run_stages(cfg)
    demo_run.run_stages(cfg)
    assert ran == ["generate", "faithfulness"]
    monkeypatch.setattr(demo_run, "CONTRASTS", ("streaks=regular",))
    demo_run.run_stages(cfg)
    assert ran == ["generate", "faithfulness", "faithfulness"]
    assert "[generate] generate: reused (generate done)" in capsys.readouterr().out


def test_a_changed_model_shape_redoes_the_model_and_every_later_stage(monkeypatch, tmp_path):
    """A demo folder from a version with other attention heads must not keep its models, nor what they made."""
    import lesiongen.demo.run as demo_run

    ran: list[str] = []
    monkeypatch.setattr(demo_run, "STAGES", recording_stages(("captions", "model", "base"), ran))
    cfg = Config(output_dir=str(tmp_path), quick=True)
    demo_run.run_stages(cfg)
    demo_run.run_stages(cfg)
    assert ran == ["captions", "model", "base"]
    monkeypatch.setattr(demo_run, "DEMO_ATTENTION_HEADS", (8, 8))
    demo_run.run_stages(cfg)
    assert ran == ["captions", "model", "base", "model", "base"]
