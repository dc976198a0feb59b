"""generate.py on the tiny model (CPU, 32 px, 2 steps): files, manifest, seeds, resume, shards, models, errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import failing_compiler, write_metrics
from PIL import Image

import lesiongen.diffusion.generate as generate_module
from lesiongen import labels
from lesiongen.captions.build import caption_record
from lesiongen.captions.metadata import load_d7p, load_ham10000
from lesiongen.cli import parse_config
from lesiongen.diffusion import plans
from lesiongen.diffusion.generate import (
    FLOW_SCHEDULERS,
    MANIFEST_COLUMNS,
    SCHEDULERS,
    GenerateConfig,
    Processes,
    build_prompt,
    generate,
    load_model,
    main,
    make_plan,
    resolve_dtype,
)
from lesiongen.diffusion.manifest import DATASET_COLUMNS
from lesiongen.errors import InputError
from lesiongen.files import read_jsonl
from lesiongen.tables import read_image_table

REPO = Path(__file__).resolve().parents[1]


def config(model: Path, out: Path, **kw) -> GenerateConfig:
    base = dict(
        model_path=str(model),
        output_dir=str(out),
        mode="dataset",
        condition="mel",
        num_images=3,
        guidance_scale=[5.0],
        num_inference_steps=[2],
        resolution=32,
        batch_size=4,
        device="cpu",
        contact_sheet=4,
    )
    base.update(kw)
    cfg = GenerateConfig(**base)
    return cfg


def manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def imagefolder(root: Path, cache: Path):
    """The folder as Hugging Face datasets reads it, with no export step: its imagefolder builder, offline."""
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(cache))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    cfg = GenerateConfig(model_path=str(tiny_sd_dir), device="cpu")
    return load_model(cfg, "cpu")


def test_dataset_mode_writes_images_manifest_and_contact_sheet(tiny_sd_dir, pipe, tmp_path):
    cfg = config(tiny_sd_dir, tmp_path / "out", condition="Melanoma,DF", balance=["sex"], guidance_scale=[3.0, 7.5])
    result = generate(cfg, pipe=pipe)
    rows = manifest(tmp_path / "out")
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert sorted(r["file_name"] for r in rows) == sorted(
        [f"dataset/Melanoma/mel_00000{i}.png" for i in range(3)]
        + [f"dataset/Dermatofibroma/df_00000{i}.png" for i in range(3)]
    )
    assert result.generated == 6 and result.already_done == 0
    for r in rows:
        assert pixels(tmp_path / "out" / r["file_name"]).shape == (32, 32, 3)
        assert r["label"] == r["dx"] and r["condition"] == labels.BY_CODE[r["dx"]].name
        assert r["scheduler"] == cfg.scheduler and r["model"] == str(tiny_sd_dir) and r["num_inference_steps"] == "2"
    plan = {s.image_id: s for s in make_plan(cfg)}
    for r in rows:
        spec = plan[Path(r["file_name"]).stem]
        assert (int(r["seed"]), float(r["guidance_scale"]), r["sex"]) == (spec.seed, spec.guidance_scale, spec.sex)
        # the prompt is the caption build_captions.py writes for the same record
        assert r["text"] == caption_record(spec.record(), "concept", cfg.seed)[1]["text"]
        assert all(r[c] == dict(spec.concepts)[c] for c in labels.CONCEPT_NAMES)
    for dx in ("mel", "df"):
        assert sorted(r["sex"] for r in rows if r["dx"] == dx) in (
            ["female", "male", "male"],
            ["female", "female", "male"],
        )
    table = read_image_table(tmp_path / "out")
    assert len(table) == 6 and set(table["label"]) == {"mel", "df"} and all(Path(p).is_file() for p in table["path"])
    sheet = Image.open(tmp_path / "out" / "contact_sheet.png")
    assert sheet.size[1] == 2 * (32 + 14)
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert saved["plan"]["per_condition"] == {"mel": 3, "df": 3}


def test_condition_all_with_label_captions(tiny_sd_dir, pipe, tmp_path):
    cfg = config(tiny_sd_dir, tmp_path, condition="all", num_images=1, caption_style="label", contact_sheet=2)
    generate(cfg, pipe=pipe)
    rows = manifest(tmp_path)
    assert sorted(r["dx"] for r in rows) == sorted(labels.CODES)
    assert {r["text"] for r in rows} == {f"a dermoscopic image of {c.phrase}" for c in labels.CONDITIONS}
    assert {r["concept_source"] for r in rows} == {"none"} and {r["streaks"] for r in rows} == {""}
    assert Image.open(tmp_path / "contact_sheet.png").size[1] == len(labels.CONDITIONS) * (32 + 14)


def test_same_seed_same_pixels_and_batching_does_not_change_them(tiny_sd_dir, pipe, tmp_path):
    a = generate(config(tiny_sd_dir, tmp_path / "a", num_images=4), pipe=pipe).root
    b = generate(config(tiny_sd_dir, tmp_path / "b", num_images=4), pipe=pipe).root
    c = generate(config(tiny_sd_dir, tmp_path / "c", num_images=4, batch_size=1), pipe=pipe).root
    d = generate(config(tiny_sd_dir, tmp_path / "d", num_images=4, seed=1), pipe=pipe).root
    e = generate(config(tiny_sd_dir, tmp_path / "e", num_images=4, negative_prompt="ruler, hair"), pipe=pipe).root
    for i in range(4):
        name = f"dataset/Melanoma/mel_00000{i}.png"
        assert np.array_equal(pixels(a / name), pixels(b / name))
        assert np.abs(pixels(a / name) - pixels(c / name)).max() <= 2
        assert np.abs(pixels(a / name) - pixels(d / name)).mean() > 5
        assert np.abs(pixels(a / name) - pixels(e / name)).mean() > 1
    assert {r["negative_prompt"] for r in manifest(e)} == {"ruler, hair"}


def test_auto_compiles_only_a_large_set_and_a_failing_compiler_leaves_it_sampling_eagerly(
    tiny_sd_dir, pipe, tmp_path, monkeypatch
):
    tried = failing_compiler(monkeypatch)
    monkeypatch.setattr(generate_module, "COMPILE_AFTER_DENOISING_STEPS", 5)
    small = generate(config(tiny_sd_dir, tmp_path / "small", num_images=2), pipe=pipe).root  # 2 x 2 steps
    assert not tried
    fresh = load_model(GenerateConfig(model_path=str(tiny_sd_dir), device="cpu"), "cpu")  # compiling replaces its UNet
    with torch._dynamo.config.patch(suppress_errors=False):
        large = generate(config(tiny_sd_dir, tmp_path / "large", num_images=3), pipe=fresh).root  # 3 x 2 steps
    assert tried and len(manifest(large)) == 3
    for i in range(2):
        name = f"dataset/Melanoma/mel_00000{i}.png"
        assert np.abs(pixels(small / name) - pixels(large / name)).max() <= 2  # eager sampling, batched otherwise
    assert parse_config(GenerateConfig, ["--model_path", str(tiny_sd_dir), "--torch_compile"]).torch_compile == "true"


def test_a_batch_that_runs_out_of_gpu_memory_is_sampled_in_halves_to_the_same_images(
    tiny_sd_dir, pipe, tmp_path, monkeypatch, capsys
):
    real, sizes = generate_module.sample, []

    def small_gpu(pipe, prompts, *args):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pipe, prompts, *args)

    fits = generate(config(tiny_sd_dir, tmp_path / "fits", num_images=5, batch_size=2), pipe=pipe).root
    monkeypatch.setattr(generate_module, "sample", small_gpu)
    halved = generate(config(tiny_sd_dir, tmp_path / "halved", num_images=5, batch_size=8), pipe=pipe).root
    assert sizes == [5, 4, 2, 2, 1]
    assert "sampling 2 images at a time from here" in capsys.readouterr().out
    for i in range(5):
        name = f"dataset/Melanoma/mel_00000{i}.png"
        assert np.array_equal(pixels(fits / name), pixels(halved / name))
    monkeypatch.setattr(generate_module, "sample", lambda *a: small_gpu(None, [1, 2, 3]))
    with pytest.raises(InputError, match="--batch_size 1: one image does not fit in GPU memory"):
        generate(config(tiny_sd_dir, tmp_path / "none", num_images=1, batch_size=1), pipe=pipe)


def test_killed_run_resumes_to_exactly_num_images(tiny_sd_dir, pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "METADATA_EVERY_S", 1e9)  # metadata.jsonl: after the first batch, then the end
    cfg = config(tiny_sd_dir, tmp_path / "out", num_images=6, batch_size=2)
    out = Path(cfg.output_dir)

    class Killed(Exception):
        pass

    def kill_after_three(spec, path):
        assert path.is_file()
        if len(manifest(out)) == 3:
            raise Killed

    with pytest.raises(Killed):
        generate(cfg, pipe=pipe, on_saved=kill_after_three)
    assert len(manifest(out)) == 3 and len(list((out / "dataset/Melanoma").glob("*.png"))) == 3
    # metadata.jsonl lags the manifest but lists only images on disk, so the killed folder still loads
    assert [r["file_name"] for r in read_jsonl(out / "metadata.jsonl")] == [r["file_name"] for r in manifest(out)][:2]
    assert len(imagefolder(out, tmp_path / "hf-killed")) == 2
    # the two states a kill can leave: an image renamed into place without its row, and a torn last row
    rows = (out / "manifest.csv").read_text().splitlines(keepends=True)
    (out / "manifest.csv").write_text("".join(rows[:-1]) + rows[-1][:25])
    result = generate(cfg, pipe=pipe)
    assert result.generated == 4 and result.already_done == 2
    final = manifest(out)
    names = [r["file_name"] for r in final]
    assert len(names) == 6 and len(set(names)) == 6
    assert sorted(p.name for p in (out / "dataset/Melanoma").iterdir()) == [f"mel_00000{i}.png" for i in range(6)]
    assert not [p for p in out.rglob("*.tmp")]
    assert [r["file_name"] for r in read_jsonl(out / "metadata.jsonl")] == names
    # a third run has nothing to do; an image deleted by hand is made again and listed once
    assert generate(cfg, pipe=pipe).generated == 0 and len(manifest(out)) == 6
    (out / names[2]).unlink()
    assert generate(cfg, pipe=pipe).generated == 1
    assert sorted(r["file_name"] for r in manifest(out)) == sorted(names)
    assert sorted(r["file_name"] for r in read_jsonl(out / "metadata.jsonl")) == sorted(names)
    clean = generate(dataclasses.replace(cfg, output_dir=str(tmp_path / "clean")), pipe=pipe).root
    for name in names:
        diff = np.abs(pixels(out / name) - pixels(clean / name)).max()
        # same batches as the clean run give the same pixels; the re-made image ran alone (float rounding only)
        assert diff <= 2 if name == names[2] else diff == 0


def test_resume_with_other_settings_is_refused(tiny_sd_dir, pipe, tmp_path):
    generate(config(tiny_sd_dir, tmp_path / "out", num_images=1), pipe=pipe)
    # a folder made before --total_images and --class_weights existed resumes under the same flags
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    for newer in ("total_images", "class_weights"):
        del saved["settings"][newer]
    (tmp_path / "out" / "generation_config.json").write_text(json.dumps(saved))
    assert generate(config(tiny_sd_dir, tmp_path / "out", num_images=1), pipe=pipe).already_done == 1
    # the same model reached through a link (as each mixing recipe reaches its seed's models) is the same model
    (tmp_path / "link").symlink_to(tiny_sd_dir, target_is_directory=True)
    assert generate(config(tmp_path / "link", tmp_path / "out", num_images=1), pipe=pipe).already_done == 1
    with pytest.raises(
        InputError, match=r"generation_config.json: this folder was generated with other settings \(num_images: 1 -> 2"
    ):
        generate(config(tiny_sd_dir, tmp_path / "out", num_images=2), pipe=pipe)


def test_single_mode_names_images_by_seed_and_replaces_on_rerun(tiny_sd_dir, pipe, tmp_path):
    cfg = config(tiny_sd_dir, tmp_path, mode="single", num_images=None, condition="vasc", seed=7, contact_sheet=0)
    generate(cfg, pipe=pipe)
    rows = manifest(tmp_path / "single")
    assert [(r["file_name"], r["seed"]) for r in rows] == [("Vascular lesions/vasc_seed7.png", "7")]
    generate(dataclasses.replace(cfg, skin_tone="dark"), pipe=pipe)
    rows = manifest(tmp_path / "single")
    assert len(rows) == 1 and rows[0]["skin_tone"] == "dark" and "dark skin" in rows[0]["text"]
    generate(dataclasses.replace(cfg, seed=8), pipe=pipe)
    assert [r["seed"] for r in manifest(tmp_path / "single")] == ["7", "8"]


def test_shards_union_equals_one_process(tiny_sd_dir, pipe, tmp_path):
    kw = dict(condition="mel,nv", num_images=3, batch_size=1, contact_sheet=0)
    one = generate(config(tiny_sd_dir, tmp_path / "one", **kw), pipe=pipe).root
    two = config(tiny_sd_dir, tmp_path / "two", **kw)
    made = [generate(two, pipe=pipe, processes=Processes(i, 2)).generated for i in (1, 0)]
    assert made == [3, 3]
    single_rows = {r["file_name"]: r for r in manifest(one)}
    shard_rows = {r["file_name"]: r for r in manifest(Path(two.output_dir))}
    assert single_rows == shard_rows
    for name in single_rows:
        assert np.array_equal(pixels(one / name), pixels(Path(two.output_dir) / name))


def test_builder_captions_and_generation_prompts_agree_on_real_records(ham_csv, d7p_csv):
    records = load_d7p(d7p_csv, skip_bad_rows=True).records[:40] + load_ham10000(ham_csv).records[:40]
    for rec in records:
        rec, row = caption_record(rec, "concept", 3)
        assert build_prompt(rec, "concept", 3) == row["text"]
        assert build_prompt(rec, "label", 3) == caption_record(rec, "label", 3)[1]["text"]


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - set(FLOW_SCHEDULERS)))
def test_every_scheduler_samples(tiny_sd_dir, pipe, tmp_path, name):
    import diffusers

    cfg = config(tiny_sd_dir, tmp_path, num_images=1, scheduler=name, contact_sheet=0)
    generate(cfg, pipe=pipe)
    assert type(pipe.scheduler) is getattr(diffusers, SCHEDULERS[name][0])
    image = pixels(tmp_path / "dataset/Melanoma/mel_000000.png")
    assert image.std() > 1 and manifest(tmp_path)[0]["scheduler"] == name


def test_a_flow_sampler_is_refused_for_a_ddpm_model(tiny_sd_dir, pipe, tmp_path):
    """Rectified-flow samplers (SD3, Flux) cannot sample SD 1.x; test_families samples flow models with them."""
    cfg = config(tiny_sd_dir, tmp_path, num_images=1, scheduler=FLOW_SCHEDULERS[0], contact_sheet=0)
    with pytest.raises(InputError, match="--scheduler: 'flow_euler' cannot sample a DDPM model.*choose one of ddim"):
        generate(cfg, pipe=pipe)


def test_lora_and_full_pipeline_dirs_both_load(tiny_sd_dir, pipe, tmp_path):
    import torch

    from lesiongen.diffusion.pipeline import add_lora, load_training_parts, save_lora

    unet = load_training_parts(tiny_sd_dir)["unet"]
    lora_config = add_lora(unet, rank=4, seed=0)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora_dir = save_lora(unet, lora_config, tmp_path / "lora")
    (lora_dir / "config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(tiny_sd_dir)}))

    base = generate(config(tiny_sd_dir, tmp_path / "base", num_images=1), pipe=pipe).root
    full = generate(config(tiny_sd_dir, tmp_path / "full", num_images=1)).root  # loads the pipeline dir itself
    lora = generate(config(lora_dir, tmp_path / "lora_out", num_images=1)).root
    off = generate(
        config(lora_dir, tmp_path / "lora_off", num_images=1, lora_scale=0.0, base_model=str(tiny_sd_dir))
    ).root
    name = "dataset/Melanoma/mel_000000.png"
    assert np.array_equal(pixels(base / name), pixels(full / name))
    assert np.abs(pixels(base / name) - pixels(lora / name)).mean() > 1
    assert np.array_equal(pixels(base / name), pixels(off / name))
    assert manifest(lora)[0]["model"] == str(lora_dir)


def test_a_lora_trained_by_train_py_loads_on_its_recorded_base(tiny_lora_run, tiny_sd_dir, pipe, tmp_path):
    lora = generate(config(tiny_lora_run, tmp_path / "lora", num_images=2)).root
    base = generate(config(tiny_sd_dir, tmp_path / "base", num_images=2), pipe=pipe).root
    rows = manifest(lora)
    assert len(rows) == 2 and {r["model"] for r in rows} == {str(tiny_lora_run)}
    name = rows[0]["file_name"]
    assert np.abs(pixels(lora / name) - pixels(base / name)).max() > 0


def test_the_config_records_the_model_that_ran_and_only_once_it_loaded(tiny_lora_run, tiny_sd_dir, tmp_path):
    import hashlib

    from lesiongen.diffusion.fingerprint import fingerprint

    out, not_a_model = tmp_path / "out", tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(InputError, match="--base_model .*empty: no model_index.json"):
        generate(config(tiny_lora_run, out, num_images=1, base_model=str(not_a_model)))
    assert not (out / "generation_config.json").exists()
    generate(config(tiny_lora_run, out, num_images=1))  # not held to the failed run's --base_model
    assert json.loads((out / "generation_config.json").read_text())["model"] == {
        "model_path": str(tiny_lora_run.resolve()),
        "base_model": str(tiny_sd_dir.resolve()),
        "fingerprint": fingerprint(str(tiny_sd_dir)),
        "lora_sha256": hashlib.sha256((tiny_lora_run / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest(),
        "trained_base_fingerprint": fingerprint(str(tiny_sd_dir)),
        "base_mismatch": False,
    }


def test_a_resume_on_another_model_under_the_same_path_is_refused(tiny_sd_dir, tmp_path, monkeypatch):
    from builders import perturbed_copy

    shutil.copytree(tiny_sd_dir, tmp_path / "a" / "model")
    perturbed_copy(tiny_sd_dir, tmp_path / "b" / "model")
    monkeypatch.chdir(tmp_path / "a")
    generate(config(Path("model"), tmp_path / "out", num_images=2, contact_sheet=0))
    (tmp_path / "out" / "manifest.csv").write_text(
        "".join((tmp_path / "out" / "manifest.csv").read_text().splitlines(keepends=True)[:2])
    )  # as if killed after the first image
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(InputError, match="other settings \\(model fingerprint: [0-9a-f]{16} -> [0-9a-f]{16}"):
        generate(config(Path("model"), tmp_path / "out", num_images=2, contact_sheet=0))


def test_only_temporaries_generate_left_are_removed(tiny_sd_dir, pipe, tmp_path):
    """--output_dir may hold other work: a hidden .tmp file of someone else's two folders down stays."""
    theirs = tmp_path / "notes" / "drafts" / ".draft.md.tmp"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("mine")
    ours = tmp_path / "dataset" / "Melanoma" / ".mel_000009.png.abc123.tmp"  # a kill -9 mid-save
    ours.parent.mkdir(parents=True)
    ours.write_bytes(b"half")
    generate(config(tiny_sd_dir, tmp_path, num_images=1, contact_sheet=0), pipe=pipe)
    assert theirs.read_text() == "mine" and not ours.exists()


def test_dtype_follows_the_device(tiny_sd_dir, pipe):
    import torch

    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    cfg = GenerateConfig(model_path=str(tiny_sd_dir))
    assert (resolve_dtype(cfg, "cuda"), resolve_dtype(cfg, "cuda:1"), resolve_dtype(cfg, "cpu")) == (
        "float16",
        "float16",
        "float32",
    )
    assert resolve_dtype(dataclasses.replace(cfg, dtype="bfloat16"), "cuda") == "bfloat16"


def test_bad_inputs_give_one_line_errors(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    args = ["--model_path", str(tiny_sd_dir), "--output_dir", str(tmp_path / "o"), "--device", "cpu"]
    assert main(["--condition", "Melanomma", *args]) == 2
    err = capsys.readouterr().err
    assert "--condition: unknown condition 'Melanomma'" in err and "'Melanoma' (mel)" in err and err.count("\n") == 1
    assert main(["--condition", "mel", "--model_path", str(tmp_path / "nope")]) == 2
    assert f"--model_path {tmp_path / 'nope'}: model directory not found" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # the default model path (outputs/lesiongen-lora) does not exist here
    assert main(["--condition", "mel", "--mode", "single"]) == 2
    assert (
        "--model_path outputs/lesiongen-lora: not found (the default is where train_lora.sh saves"
        in capsys.readouterr().err
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = config(tiny_sd_dir, blocker / "out")
    with pytest.raises(InputError, match=r"--output_dir .*: cannot write there"):
        generate(cfg)
    with pytest.raises(InputError, match="--caption_style label: label captions state only the diagnosis"):
        config(tiny_sd_dir, tmp_path, caption_style="label", skin_tone="dark")
    # probes of issue 15: nan guidance made NaN images with exit 0; 30 px failed inside diffusers after loading
    # issue 32: guidance 1e38 overflowed to inf and a nan LoRA scale sampled black images, both with exit 0
    for guidance in (float("nan"), 1e38, -1.0):
        with pytest.raises(InputError, match=r"--guidance_scale: must be a number in 0\.\.100"):
            config(tiny_sd_dir, tmp_path, guidance_scale=[7.5, guidance])
    for scale in (float("nan"), float("-inf"), 1e6):
        with pytest.raises(InputError, match=r"--lora_scale: must be a number in -10.0\.\.10.0"):
            config(tiny_sd_dir, tmp_path, lora_scale=scale)
    assert config(tiny_sd_dir, tmp_path, guidance_scale=[0.0, 100.0], lora_scale=-1.0).lora_scale == -1.0
    with pytest.raises(InputError, match="--resolution: 30 is not a positive multiple of 8"):
        config(tiny_sd_dir, tmp_path, resolution=30)


def test_main_single_mode_as_in_the_original_readme(tiny_sd_dir, tmp_path, capsys):
    argv = [
        "--condition",
        "Melanoma",
        "--mode",
        "single",
        "--model_path",
        str(tiny_sd_dir),
        "--output_dir",
        str(tmp_path),
    ]
    assert main([*argv, "--num_inference_steps", "2", "--resolution", "32", "--device", "cpu"]) == 0
    assert (tmp_path / "single" / "Melanoma" / "mel_seed0.png").is_file()
    assert len(manifest(tmp_path / "single")) == 1 and (tmp_path / "single" / "contact_sheet.png").is_file()
    assert "generated 1 image(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_accelerate_launch_splits_the_plan_across_two_processes(tiny_sd_dir, pipe, tmp_path):
    """Two CPU processes (gloo) through the shim, as a user launches them; the union equals one process's run."""
    args = ["--model_path", str(tiny_sd_dir), "--mode", "dataset", "--condition", "mel,nv", "--num_images", "3"]
    args += ["--num_inference_steps", "2", "--guidance_scale", "5", "--resolution", "32", "--batch_size", "1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29731",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [*launch, "generate.py", *args, "--output_dir", str(tmp_path / "two")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0/2: generated 3" in done.stdout and "process 1/2: generated 3" in done.stdout
    one = generate(config(tiny_sd_dir, tmp_path / "one", condition="mel,nv", batch_size=1), pipe=pipe).root
    two_rows = {r["file_name"]: r for r in manifest(tmp_path / "two")}
    assert len(two_rows) == 6 and two_rows == {r["file_name"]: r for r in manifest(one)}
    for name in two_rows:
        assert np.array_equal(pixels(one / name), pixels(tmp_path / "two" / name))


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_without_duplicates(tiny_sd_dir, pipe, tmp_path):
    """A real kill -9 of the command a user runs, then the same command again (here in-process)."""
    import signal
    import time

    cfg = config(tiny_sd_dir, tmp_path / "out", num_images=8, batch_size=1, contact_sheet=0)
    argv = ["--model_path", cfg.model_path, "--output_dir", cfg.output_dir, "--mode", "dataset", "--condition", "mel"]
    argv += ["--num_images", "8", "--batch_size", "1", "--guidance_scale", "5", "--num_inference_steps", "2"]
    argv += ["--resolution", "32", "--device", "cpu", "--contact_sheet", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "generate.py", *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    out = Path(cfg.output_dir)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "manifest.csv").is_file() and len(manifest(out)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(manifest(out))
    assert 2 <= before < 8, "the run finished before it could be killed"
    result = generate(cfg, pipe=pipe)
    rows = manifest(out)
    assert result.generated == 8 - before
    assert sorted(r["file_name"] for r in rows) == [f"dataset/Melanoma/mel_00000{i}.png" for i in range(8)]
    assert sorted(p.name for p in (out / "dataset/Melanoma").iterdir()) == [f"mel_00000{i}.png" for i in range(8)]


def test_contrast_pairs_share_seed_and_prompt_but_one_switch(tiny_sd_dir, pipe, tmp_path):
    switches = ["blue_whitish_veil", "streaks"]  # both have an 'absent' side: each needs its own file
    cfg = config(tiny_sd_dir, tmp_path / "pairs", condition="mel,bcc", num_images=2, contrast=switches)
    result = generate(cfg, pipe=pipe)
    rows = manifest(tmp_path / "pairs")
    assert result.planned == len(rows) == 2 * 2 * 2 * 2
    assert (
        len({r["file_name"] for r in rows}) == len(rows) == len(list((tmp_path / "pairs" / "dataset").rglob("*.png")))
    )
    by_pair: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_pair.setdefault((r["pair"], r["contrast"]), []).append(r)
    assert len(by_pair) == 8
    for a, b in [pair for (_, contrast), pair in by_pair.items() if contrast.startswith("blue_whitish_veil")]:
        assert a["contrast"] == b["contrast"] == "blue_whitish_veil=present:absent"
        assert {a["blue_whitish_veil"], b["blue_whitish_veil"]} == {"present", "absent"}
        assert a["seed"] == b["seed"] and a["index"] == b["index"] and a["file_name"] != b["file_name"]
        on, off = (a, b) if a["blue_whitish_veil"] == "present" else (b, a)
        assert "blue-whitish veil" in on["text"] and "no blue-whitish veil" in off["text"]
        for c in labels.CONCEPT_NAMES:
            if c != "blue_whitish_veil":
                assert a[c] == b[c]
        assert not np.array_equal(
            pixels(tmp_path / "pairs" / on["file_name"]), pixels(tmp_path / "pairs" / off["file_name"])
        )
    with pytest.raises(InputError, match="label captions state only the diagnosis"):
        config(tiny_sd_dir, tmp_path / "x", contrast=["streaks"], caption_style="label")
    with pytest.raises(InputError, match="blue_whitish_veil is also fixed or balanced"):
        config(tiny_sd_dir, tmp_path / "x", contrast=["blue_whitish_veil"], concepts=["blue_whitish_veil=present"])


def test_contrast_guidance_samples_each_side_against_the_other(tiny_sd_dir, pipe, tmp_path):
    """Each image of a pair is sampled with its partner's prompt as the negative prompt: the manifest says so,
    and the pixels are what the pipeline gives for that prompt, negative prompt and seed."""
    import torch

    cfg = config(tiny_sd_dir, tmp_path / "pairs", num_images=2, contrast=["blue_whitish_veil"], contrast_guidance=True)
    generate(cfg, pipe=pipe)
    rows = manifest(tmp_path / "pairs")
    assert len(rows) == 4
    for r in rows:
        partner = next(o for o in rows if o["pair"] == r["pair"] and o is not r)
        assert r["negative_prompt"] == partner["text"] != r["text"]
    first = rows[0]
    direct = pipe(
        prompt=first["text"],
        negative_prompt=first["negative_prompt"],
        guidance_scale=5.0,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(int(first["seed"])),
        height=32,
        width=32,
    ).images[0]
    saved = pixels(tmp_path / "pairs" / first["file_name"]).astype(int)
    assert np.abs(saved - np.asarray(direct, dtype=int)).max() <= 2
    plain = config(tiny_sd_dir, tmp_path / "plain", num_images=2, contrast=["blue_whitish_veil"])
    generate(plain, pipe=pipe)
    assert not np.array_equal(saved, pixels(tmp_path / "plain" / first["file_name"]))
    with pytest.raises(InputError, match="--contrast_guidance: needs --contrast"):
        config(tiny_sd_dir, tmp_path / "x", contrast_guidance=True)
    with pytest.raises(InputError, match="--contrast_guidance: sets each image's negative prompt"):
        config(tiny_sd_dir, tmp_path / "x", contrast=["streaks"], contrast_guidance=True, negative_prompt="blurry")


def test_an_image_of_one_colour_or_from_nan_is_listed_invalid_and_left_out_of_every_set(
    tiny_sd_dir, pipe, tmp_path, monkeypatch, capsys
):
    """Issue 32: a nan LoRA scale or an overflowing guidance sampled nan, which converts to black PNGs that the
    manifest listed as valid and the export and classifier took. Such images stay on disk and in the manifest
    (a rerun does not redo them) with valid=false and a reason; the summary counts them; readers leave them out."""
    import numpy as np

    from lesiongen.diffusion.export import ExportConfig, export

    real = generate_module.sample

    def diverging(pipe, prompts, negatives, seeds, *args):
        images = list(real(pipe, prompts, negatives, seeds, *args))
        for i, seed in enumerate(seeds):
            if seed == plan[1].seed:
                images[i] = np.full_like(images[i], np.nan)
            elif seed == plan[2].seed:
                images[i] = np.full_like(images[i], 0.25)
        return images

    cfg = config(tiny_sd_dir, tmp_path / "out", num_images=4)
    plan = make_plan(cfg)
    monkeypatch.setattr(generate_module, "sample", diverging)
    generate(cfg, pipe=pipe)
    rows = {r["index"]: r for r in manifest(tmp_path / "out")}
    assert [rows[str(s.index)]["valid"] for s in plan] == ["true", "false", "false", "true"]
    assert rows[str(plan[1].index)]["invalid_reason"] == "nan or inf in the sampled pixels"
    assert rows[str(plan[2].index)]["invalid_reason"] == "every pixel has one colour"
    assert rows[str(plan[0].index)]["invalid_reason"] == ""
    assert (pixels(tmp_path / "out" / rows[str(plan[1].index)]["file_name"]) == 0).all()  # black, as before
    assert "2 image(s) invalid (nan or inf in the sampled pixels" in capsys.readouterr().out

    table = read_image_table(tmp_path / "out")
    assert sorted(table["index"].astype(int)) == [plan[0].index, plan[3].index]
    assert len(table.attrs["skipped"]["invalid_image"]) == 2
    assert export(ExportConfig(input_dir=str(tmp_path / "out"), output_dir=str(tmp_path / "hf"))).rows == 2
    assert generate(cfg, pipe=pipe).generated == 0  # kept, so a rerun does not sample them again


def test_total_images_makes_a_class_mix_in_one_folder_that_imagefolder_loads(
    tiny_sd_dir, pipe, tmp_path, capsys, monkeypatch
):
    """Issue 31: N images in all, by class weights and balanced over a subgroup, in one run and one folder, which
    datasets' imagefolder loads as exactly those images with every manifest column (no contact sheet, no export)."""
    out = tmp_path / "mix"
    cfg = config(
        tiny_sd_dir,
        out,
        condition="all",
        num_images=None,
        total_images=10,
        class_weights=["mel=0.5,nv=0.3", "df=0.2"],
        balance=["sex"],
        contact_sheet=2,
    )
    monkeypatch.setattr(plans, "PLAN_SECONDS_PER_IMAGE", 10.0)  # as if the plan were large: it says so first
    result = generate(cfg, pipe=pipe)
    rows = manifest(out)
    assert result.planned == len(rows) == 10
    assert Counter(r["label"] for r in rows) == {"mel": 5, "nv": 3, "df": 2}
    assert Counter(r["sex"] for r in rows) == {"male": 5, "female": 5}
    printed = capsys.readouterr().out
    assert printed.startswith("planning 10 images (about 100 s)\nplan: 10 images\n")
    assert "plan: 10 images\n  class: df 2, mel 5, nv 3\n  sex: " in printed
    assert "10 planned (10 in all)" in printed
    assert (out / "contact_sheet.png").is_file()

    ds = imagefolder(out, tmp_path / "hf")
    assert len(ds) == 10 and ds.column_names == ["image", *DATASET_COLUMNS[1:]]
    by_seed = {r["seed"]: r for r in ds}
    for r in rows:
        loaded = by_seed[int(r["seed"])]
        assert loaded["image"].size == (32, 32)
        assert np.array_equal(np.asarray(loaded["image"].convert("RGB"), np.int16), pixels(out / r["file_name"]))
        assert (loaded["label"], loaded["text"], loaded["sex"]) == (r["label"], r["text"], r["sex"])
        assert (loaded["guidance_scale"], loaded["num_inference_steps"]) == (5.0, 2)
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["plan"]["per_condition"] == {"df": 2, "mel": 5, "nv": 3}
    assert saved["settings"]["total_images"] == 10 and saved["settings"]["num_images"] is None


def test_class_weights_may_come_from_the_distribution_file(tiny_sd_dir, tmp_path):
    csv = tmp_path / "dist.csv"
    csv.write_text("dx,skin_tone,weight\nmel,dark,3\nmel,light,3\nbcc,brown,2\n")
    cfg = config(tiny_sd_dir, tmp_path, condition="all", num_images=None, total_images=12, distribution=str(csv))
    plan = make_plan(cfg)
    assert Counter(s.dx for s in plan) == {"mel": 9, "bcc": 3}  # 12 x 6/8 and 12 x 2/8
    tones = Counter(s.skin_tone for s in plan)
    assert tones["brown"] == 3 and sorted([tones["dark"], tones["light"]]) == [4, 5]


def test_the_default_sampler_is_the_quality_matched_fast_setting_and_the_original_grid_is_one_flag(tiny_sd_dir):
    default = parse_config(GenerateConfig, ["--model_path", str(tiny_sd_dir), "--mode", "dataset"])
    assert (default.scheduler, default.guidance_scale, default.num_inference_steps) == ("dpmsolver++", [3.0], [10])
    assert {(s.guidance_scale, s.num_inference_steps) for s in make_plan(default)} == {(3.0, 10)}
    grid = parse_config(GenerateConfig, ["--model_path", str(tiny_sd_dir), "--mode", "dataset", "--original_grid"])
    drawn = make_plan(grid)
    assert {s.guidance_scale for s in drawn} == set(plans.ORIGINAL_GUIDANCE_SCALES)
    assert {s.num_inference_steps for s in drawn} == set(plans.ORIGINAL_STEPS)
    assert [s.seed for s in drawn] == [s.seed for s in make_plan(default)]  # the same images, sampled otherwise
    assert generate_module.settings(grid)["guidance_scale"] == list(plans.ORIGINAL_GUIDANCE_SCALES)


def test_class_mix_sampling_and_plan_size_errors_are_one_line(tiny_sd_dir, tmp_path, capsys):
    args = ["--model_path", str(tiny_sd_dir), "--output_dir", str(tmp_path / "o"), "--mode", "dataset"]
    cases = {
        "--total_images: cannot be combined with --num_images (images per condition)": [
            "--total_images", "100", "--num_images", "10"],
        f"--class_weights: 'melanome' is not a dx code; use {', '.join(labels.CODES)}": [
            "--total_images", "100", "--class_weights", "nv=0.4,melanome=0.6"],
        "--class_weights: needs --total_images": ["--class_weights", "nv=1"],
        "--class_weights: weights bcc, which --condition leaves out (mel, nv)": [
            "--condition", "mel,nv", "--total_images", "10", "--class_weights", "mel=1,bcc=1"],
        "--total_images: 0 is not positive": ["--total_images", "0"],
        "--original_grid: draws each image's guidance and steps from the original's grid": [
            "--original_grid", "--guidance_scale", "7.5"],
        # issue 32: this built a plan in memory for minutes with no output
        "--num_images 10000000: plans 70,000,000 images, which need about 70 GB of memory": [
            "--num_images", "10000000"],
        "--total_images 2000000: plans 8,000,000 images": [  # two switches, two sides each
            "--total_images", "2000000", "--contrast", "streaks", "blue_whitish_veil"],
    }  # fmt: skip
    for message, extra in cases.items():
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main([*args[:2], "--mode", "single", "--total_images", "5"]) == 2
    assert "--total_images: needs --mode dataset" in capsys.readouterr().err


def test_a_target_run_aims_at_the_weakest_class_and_tone_says_how_and_resumes_only_on_the_same_file(
    tiny_sd_dir, pipe, tmp_path, capsys
):
    """Issue 34: --target reads eval.py's metrics.json; mel (recall 0.2) gets (0.8 + 0.05) / (0.85 + 0.15) of the
    images, nv (recall 0.9) the rest, and within each class the tone the classifier does worst on gets the most."""
    metrics = write_metrics(
        tmp_path / "metrics.json",
        {"mel": 0.2, "nv": 0.9},
        skin_tone={"very light": (0.9, 20), "light": (0.9, 20), "brown": (0.2, 10)},
        sex={"male": (0.8, 25), "female": (0.7, 25)},
    )
    out = tmp_path / "out"
    cfg = config(tiny_sd_dir, out, condition="mel,nv", num_images=None, total_images=20, target=str(metrics))
    generate(cfg, pipe=pipe)
    rows = manifest(out)
    assert Counter(r["label"] for r in rows) == {"mel": 17, "nv": 3}
    tones = Counter(r["skin_tone"] for r in rows if r["label"] == "mel")
    assert tones.most_common(1)[0][0] == "brown" and sum(tones.values()) == 17
    printed = capsys.readouterr().out
    assert f"  target (from {metrics}): weight = (1 - recall) + 0.05, normalised: mel 0.85, nv 0.15\n" in printed
    assert "  target skin_tone within each class: weight = (1 - accuracy) + 0.05, normalised: very light 0." in printed
    assert generate(cfg, pipe=pipe).already_done == 20
    write_metrics(metrics, {"mel": 0.6, "nv": 0.9}, skin_tone={"very light": (0.9, 20), "brown": (0.2, 10)})
    with pytest.raises(InputError, match=r"other settings \(target_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"):
        generate(cfg, pipe=pipe)


def test_target_errors_are_one_line(tiny_sd_dir, tmp_path, capsys):
    metrics = write_metrics(tmp_path / "metrics.json", {"mel": 0.2}, skin_tone={"light": (0.9, 9), "tan": (0.5, 9)})
    (tmp_path / "runs.csv").write_text("model,accuracy\nresnet18,0.8\n")
    args = ["--model_path", str(tiny_sd_dir), "--output_dir", str(tmp_path / "o"), "--mode", "dataset"]
    target = ["--target", str(metrics), "--total_images", "10"]
    cases = {
        f"{tmp_path / 'runs.csv'}: is not JSON (Expecting value at line 1); pass --target a metrics.json from "
        "classification/eval.py (overall.per_class with each class's recall, subgroups per field)": [
            "--target", str(tmp_path / "runs.csv"), "--total_images", "10"],
        "--target: needs --total_images; add e.g. --total_images 10000": ["--target", str(metrics)],
        "--target: sets the weights --class_weights sets; drop --class_weights or --target": [
            *target, "--class_weights", "mel=1"],
        "--target: weights the groups of one field itself; drop --balance": [*target, "--balance", "sex"],
        "--target_field: 'colour' is not a subgroup field; choose from sex, age_bin, site_group, skin_tone": [
            *target, "--target_field", "colour"],
        "--target_field: skin_tone is also fixed": [*target, "--target_field", "skin_tone", "--skin_tone", "tan"],
        "--target_field: needs --target": ["--target_field", "sex"],
    }  # fmt: skip
    for message, extra in cases.items():
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    # fixing the worst field leaves the target on the others; here none ranks two groups, so only classes are aimed
    cfg = config(tiny_sd_dir, tmp_path, num_images=None, total_images=10, target=str(metrics), skin_tone="tan")
    assert {s.skin_tone for s in make_plan(cfg)} == {"tan"} and len(make_plan(cfg)) == 10
