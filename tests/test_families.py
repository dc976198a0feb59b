"""Every model family through the one loop, on its tiny build and real Derm7pt images: the build loads with the
stock pipeline class, a LoRA trains (the loss falls), loads with the stock ``load_lora_weights`` and changes
the output, its kohya copy gives the same images, a crash resumes to the same weights, and generate.py writes
a resumable dataset. Parametrized over ``FAMILIES`` through the ``family_name`` fixture."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lesiongen.diffusion.train as train_module
from lesiongen.diffusion.dataset import ImageCaptionDataset, collate, read_examples
from lesiongen.diffusion.families import (
    FAMILIES,
    NOISE_SCHEDULERS,
    denoiser,
    detect_family,
    model_index,
    tokenize,
)
from lesiongen.diffusion.generate import GenerateConfig, generate, load_model
from lesiongen.diffusion.loss import batch_loss
from lesiongen.diffusion.pipeline import INTERCHANGE_NAMES, load_training_parts
from lesiongen.diffusion.train import TrainConfig, train
from lesiongen.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def lora_config(model: Path, data: Path, out: Path) -> TrainConfig:
    """A LoRA (rank 4, alpha 8, EMA) of 8 steps on real Derm7pt images, checkpoint at 4, validation at 8; lr 1e-2
    so the loss measurably falls in 8 steps."""
    return TrainConfig(
        pretrained_model_name_or_path=str(model),
        train_data_dir=str(data),
        output_dir=str(out),
        cache_dir=str(out.parent / "cache"),
        resolution=64,
        rank=4,
        lora_alpha=8,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        max_train_steps=8,
        learning_rate=1e-2,
        checkpointing_steps=4,
        validation_steps=8,
        validation_inference_steps=2,
        use_ema=True,
        ema_decay=0.1,  # the saved EMA stays near the last steps, so it shows the fall (and still lags them)
        gradient_checkpointing=True,  # as train_lora.sh trains
        seed=0,
    )


@pytest.fixture(scope="session")
def family_lora_run(tiny_family_dir: Path, family_name: str, d7p_small_train: Path, tmp_path_factory) -> Path:
    """The family's LoRA run, trained once per session; its output folder."""
    out = tmp_path_factory.mktemp(f"lora_{family_name}") / "lora"
    train(lora_config(tiny_family_dir, d7p_small_train, out))
    return out


def stock_pipeline(family_name: str, folder: Path):
    family = FAMILIES[family_name]
    pipe = family.pipeline_class().from_pretrained(folder, **family.pipeline_extras)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe(
        "melanoma, dermoscopic image", num_inference_steps=2, generator=g, height=64, width=64, output_type="np"
    ).images[0]


def test_the_tiny_build_is_a_stock_pipeline_of_its_family(family_name, tiny_family_dir):
    family = FAMILIES[family_name]
    assert model_index(str(tiny_family_dir))["_class_name"] == family.pipeline
    assert detect_family(str(tiny_family_dir)) is family
    pipe = stock_pipeline(family_name, tiny_family_dir)
    assert type(pipe).__name__ == family.pipeline
    a, b = image(pipe), image(pipe)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, image(pipe, seed=1))
    parts = load_training_parts(tiny_family_dir)
    assert parts["family"] is family and all(n in parts for n in (*family.text_encoders, *family.tokenizers))
    n_params = sum(p.numel() for n in ("unet", "vae", *family.text_encoders) for p in parts[n].parameters())
    assert n_params < 12e6  # tiny: a test step stays well under a second on one core


def test_model_family_overrides_detection_and_unknown_names_are_refused(tiny_sd_dir):
    assert detect_family(str(tiny_sd_dir)).name == "sd1"
    assert detect_family(str(tiny_sd_dir), "sd2").name == "sd2"
    with pytest.raises(InputError, match="--model_family.*unknown family 'sd9'.*sd1"):
        detect_family(str(tiny_sd_dir), "sd9")


def fixed_batch_loss(pipe, family_name: str, data: Path) -> float:
    """The training loss of one fixed batch (every image, fixed noise and timesteps) under the pipe's weights."""
    import diffusers

    family = FAMILIES[family_name]
    tokenizers = [getattr(pipe, n) for n in family.tokenizers]
    for t, part in zip(tokenizers, family.text_parts, strict=True):
        t.model_max_length = part.max_length or t.model_max_length  # as load_training_parts sets it
    examples = read_examples(data, [getattr(pipe, family.caption_tokenizer)], family.caption_field)
    dataset = ImageCaptionDataset(examples, tokenizers, 64, center_crop=True)
    batch = collate([dataset[(i, False, False, 1000 + i)] for i in range(len(examples))])
    predict = denoiser(family, [getattr(pipe, n) for n in family.text_encoders], pipe.vae)
    noise_scheduler = getattr(diffusers, NOISE_SCHEDULERS[family.objective]).from_config(pipe.scheduler.config)
    with torch.no_grad():
        return batch_loss(batch, getattr(pipe, family.denoiser), pipe.vae, predict, noise_scheduler, seed=5).item()


def test_a_lora_trains_on_real_images_and_loads_in_the_stock_pipeline(
    family_name, tiny_family_dir, family_lora_run, d7p_small_train
):
    out = family_lora_run
    record = json.loads((out / "config.json").read_text())
    assert record["model_family"] == family_name and record["caption_field"] == FAMILIES[family_name].caption_field
    assert (out / "validation" / "step-000008.png").is_file() and (out / "checkpoint-8").is_dir()
    assert f"from diffusers import {FAMILIES[family_name].pipeline}" in (out / "README.md").read_text()

    pipe = stock_pipeline(family_name, tiny_family_dir)
    before = image(pipe)
    pipe.load_lora_weights(str(out))
    assert np.abs(image(pipe) - before).mean() > 1e-3
    trained = fixed_batch_loss(pipe, family_name, d7p_small_train)
    pipe.disable_lora()
    untrained = fixed_batch_loss(pipe, family_name, d7p_small_train)
    assert trained < 0.98 * untrained, (trained, untrained)  # 3-7% after 8 steps, measured


def test_the_interchange_copy_loads_back_to_the_same_images(family_name, tiny_family_dir, family_lora_run):
    family = FAMILIES[family_name]
    name = INTERCHANGE_NAMES[family.interchange]
    copy = load_file(family_lora_run / name)
    if family.interchange == "kohya":
        assert copy and all(k.startswith("lora_unet_") for k in copy)
        alphas = [v for k, v in copy.items() if k.endswith(".alpha")]
        assert alphas and all(float(a) == 8.0 for a in alphas)  # the trained alpha, not the rank
    else:  # ComfyUI's diffusers-key form, alpha / rank (8 / 4) folded into lora_B
        diffusers_file = load_file(family_lora_run / "pytorch_lora_weights.safetensors")
        assert copy.keys() == diffusers_file.keys() and all(k.startswith("transformer.") for k in copy)
        assert all(torch.allclose(copy[k], diffusers_file[k] * (2 if ".lora_B." in k else 1)) for k in copy)
    pipe = stock_pipeline(family_name, tiny_family_dir)
    base = image(pipe)
    pipe.load_lora_weights(str(family_lora_run), adapter_name="diffusers")
    a = image(pipe)
    pipe.delete_adapters("diffusers")
    assert np.array_equal(image(pipe), base)
    pipe.load_lora_weights(str(family_lora_run), weight_name=name, adapter_name="interchange")
    b = image(pipe)
    assert np.abs(a - base).mean() > 1e-3 and np.allclose(a, b, atol=1e-4)


def test_a_crash_resumes_to_the_uninterrupted_weights_with_lora_ema(
    family_name, tiny_family_dir, d7p_small_train, family_lora_run, tmp_path, monkeypatch
):
    cfg = replace(lora_config(tiny_family_dir, d7p_small_train, family_lora_run), output_dir=str(tmp_path / "crashed"))
    real_loss, calls = train_module.batch_loss, {"n": 0}

    def crash_in_step_6(*args, **kwargs):  # two micro-batches a step
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", crash_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_module, "batch_loss", real_loss)
    assert [p.name for p in (tmp_path / "crashed").glob("checkpoint-*")] == ["checkpoint-4"]
    resumed = train(replace(cfg, resume_from_checkpoint="latest"))
    assert resumed.global_step == 8 and len(resumed.losses) == 4
    a = load_file(family_lora_run / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "crashed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the EMA is what was saved: it lags the raw adapters of the last checkpoint
    raw = {canonical(k): v for k, v in load_file(family_lora_run / "checkpoint-8" / "model.safetensors").items()}
    saved = {canonical(k): v for k, v in a.items()}
    assert raw.keys() == saved.keys() and any(not torch.allclose(raw[k], saved[k], atol=1e-6) for k in saved)


def canonical(key: str) -> str:
    """One name for an adapter weight in PEFT's (checkpoint) and diffusers' (saved LoRA) spellings."""
    key = re.sub(r"^(unet|transformer)\.", "", key)
    key = re.sub(r"\.(lora\.up|lora_B(\.default)?)\.weight$", ".B", key)
    return re.sub(r"\.(lora\.down|lora_A(\.default)?)\.weight$", ".A", key)


def test_generate_writes_a_resumable_manifest_backed_dataset(family_name, family_lora_run, tmp_path):
    cfg = GenerateConfig(
        model_path=str(family_lora_run),
        output_dir=str(tmp_path / "gen"),
        mode="dataset",
        condition="mel,nv",
        num_images=1,
        guidance_scale=[4.0],
        num_inference_steps=[2],
        batch_size=2,
        device="cpu",
        resolution=64,
        scheduler="flow_euler" if FAMILIES[family_name].objective == "flow" else "dpmsolver++",
        contrast=["blue_whitish_veil"],
        contact_sheet=2,
    )

    class Killed(Exception):
        pass

    def kill_after_three(spec, path):
        if len(rows()) == 3:
            raise Killed

    def rows() -> list[dict]:
        with open(tmp_path / "gen" / "manifest.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    with pytest.raises(Killed):
        generate(cfg, on_saved=kill_after_three)
    result = generate(cfg)
    assert result.planned == 4 and result.already_done == 3 and result.generated == 1
    names = [r["file_name"] for r in rows()]
    assert len(names) == len(set(names)) == 4 and all((tmp_path / "gen" / n).is_file() for n in names)
    pairs: dict[str, list[dict]] = {}
    for r in rows():
        pairs.setdefault(r["pair"], []).append(r)
    assert len(pairs) == 2 and all(a["seed"] == b["seed"] for a, b in pairs.values())
    assert (tmp_path / "gen" / "contact_sheet.png").is_file()
    if FAMILIES[family_name].caption_field == "long_text":  # T5 families are prompted as they were trained
        assert all(r["text"].startswith("Dermoscopic image of") for r in rows())
    wrong = "dpmsolver++" if cfg.scheduler == "flow_euler" else "flow_euler"
    with pytest.raises(InputError, match=f"--scheduler: '{re.escape(wrong)}' cannot sample"):
        generate(replace(cfg, scheduler=wrong, output_dir=str(tmp_path / "wrong")))


@pytest.mark.slow
@pytest.mark.parametrize("family_name", ["flux"], indirect=True)  # the family furthest from SD 1.x
def test_train_lora_sh_takes_any_family_and_a_kill_9_resumes_to_the_same_weights(
    family_name, tiny_family_dir, d7p_small_train, family_lora_run, tmp_path
):
    """train_lora.sh, unchanged, on the tiny Flux build with the fixture's settings; kill -9 once checkpoint-4
    is written, then --resume_from_checkpoint latest ends on the uninterrupted run's weights."""
    cfg = replace(lora_config(tiny_family_dir, d7p_small_train, family_lora_run), output_dir=str(tmp_path / "k"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_CONFIG": "external/cpu.yaml",
        "ACCELERATE": str(Path(sys.executable).with_name("accelerate")),
        "MODEL_NAME": cfg.pretrained_model_name_or_path,
        "TRAIN_DATA_DIR": cfg.train_data_dir,
        "OUTPUT_DIR": cfg.output_dir,
        "RESOLUTION": str(cfg.resolution),
        "TRAIN_BATCH_SIZE": str(cfg.train_batch_size),
        "GRADIENT_ACCUMULATION_STEPS": str(cfg.gradient_accumulation_steps),
        "MAX_TRAIN_STEPS": str(cfg.max_train_steps),
        "LEARNING_RATE": str(cfg.learning_rate),
        "LORA_RANK": str(cfg.rank),
        "MIXED_PRECISION": "no",
        "CHECKPOINTING_STEPS": str(cfg.checkpointing_steps),
        "VALIDATION_STEPS": str(cfg.validation_steps),
        "SEED": str(cfg.seed),
    }
    extra = ["--lora_alpha", "8", "--use_ema", "--ema_decay", str(cfg.ema_decay), "--cache_dir", cfg.cache_dir]
    extra += ["--validation_inference_steps", "2"]
    proc = subprocess.Popen(  # its own process group: accelerate launch runs the training as a child
        ["bash", "train_lora.sh", *extra],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "k" / "checkpoint-4").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "k" / "checkpoint-4").is_dir(), proc.stderr.read()[-3000:]
    assert not (tmp_path / "k" / "pytorch_lora_weights.safetensors").exists()
    assert train(replace(cfg, resume_from_checkpoint="latest")).global_step == 8
    a = load_file(family_lora_run / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "k" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("family_name", ["sdxl"], indirect=True)
def test_sdxl_is_conditioned_on_each_frames_file_size_and_crop_as_its_pipeline_encodes_them(
    family_name, tiny_family_dir
):
    family = FAMILIES[family_name]
    pipe = stock_pipeline(family_name, tiny_family_dir)
    encoders = [getattr(pipe, n) for n in family.text_encoders]
    batch = tokenize([getattr(pipe, n) for n in family.tokenizers], ["melanoma", "nevus"])
    batch |= {"original_size": torch.tensor([[512, 768], [64, 64]]), "crop_top_left": torch.tensor([[0, 16], [0, 0]])}
    torch.manual_seed(0)
    noisy, t = torch.randn(2, pipe.unet.config.in_channels, 16, 16), torch.tensor([500, 500])
    with torch.no_grad():
        ours = denoiser(family, encoders, pipe.vae)(pipe.unet, batch, noisy, t)
        unframed = denoiser(family, encoders, pipe.vae)(
            pipe.unet, {k: batch[k] for k in ("input_ids", "input_ids_2")}, noisy, t
        )
        embeds = family.encode(encoders, [batch["input_ids"], batch["input_ids_2"]])
        dim = pipe.text_encoder_2.config.projection_dim
        time_ids = torch.cat(
            [
                pipe._get_add_time_ids((512, 768), (0, 16), (64, 64), torch.float32, text_encoder_projection_dim=dim),
                pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=dim),
            ]
        )
        added = {"text_embeds": embeds["pooled_prompt_embeds"], "time_ids": time_ids}
        stock = pipe.unet(noisy, t, encoder_hidden_states=embeds["prompt_embeds"], added_cond_kwargs=added).sample
    assert torch.allclose(ours, stock, atol=1e-5)
    # without a file (validation, a hand-made batch) the pipeline's default: the frame itself, uncropped
    assert torch.allclose(unframed[1], ours[1], atol=1e-5) and not torch.allclose(unframed[0], ours[0], atol=1e-4)


@pytest.mark.parametrize("family_name", ["sdxl", "sd3", "flux"], indirect=True)
def test_train_text_encoder_trains_every_clip_encoder_keeps_t5_frozen_and_resumes(
    family_name, tiny_family_dir, d7p_small_train, tmp_path
):
    family = FAMILIES[family_name]
    cfg = replace(
        lora_config(tiny_family_dir, d7p_small_train, tmp_path / "full"),
        mode="full",
        train_text_encoder=True,
        use_ema=False,
        max_train_steps=2,
        checkpointing_steps=1,
        validation_steps=2,
        learning_rate=1e-3,
    )
    train(cfg)
    saved, base = stock_pipeline(family_name, tmp_path / "full"), stock_pipeline(family_name, tiny_family_dir)
    assert (tmp_path / "full" / "validation" / "step-000002.png").is_file()
    for name in family.text_encoders:
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(getattr(saved, name).parameters(), getattr(base, name).parameters(), strict=True)
        )
        assert changed == (name in family.trainable_text_encoders), name
    assert (
        family.trainable_text_encoders
        == {
            "sdxl": ("text_encoder", "text_encoder_2"),
            "sd3": ("text_encoder", "text_encoder_2"),  # not text_encoder_3, the T5
            "flux": ("text_encoder",),  # not text_encoder_2, the T5
        }[family_name]
    )
    # resuming from step 1 reaches the same encoders as the uninterrupted run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-1", resumed_dir / "checkpoint-1")
    train(replace(cfg, output_dir=str(resumed_dir), resume_from_checkpoint="latest", validation_steps=0))
    again = stock_pipeline(family_name, resumed_dir)
    for name in ("unet" if family.denoiser == "unet" else "transformer", *family.trainable_text_encoders):
        pairs = zip(getattr(again, name).parameters(), getattr(saved, name).parameters(), strict=True)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in pairs), name


def test_image_to_image_and_the_kept_lesion_work_with_a_lora(family_name, family_lora_run, d7p_small_train, tmp_path):
    """--mode edit --keep lesion on real Derm7pt images: the lesion's pixels come back exactly while the skin
    changes; under the mask the final latents are the source's (blended at every step, not only pasted); a small
    strength ends near the source's latents and strength 1.0 far from them."""
    from lesiongen.diffusion.edit import Editor, pipeline_inputs

    flow = FAMILIES[family_name].objective == "flow"
    cfg = GenerateConfig(
        model_path=str(family_lora_run),
        output_dir=str(tmp_path / "edit"),
        mode="edit",
        data_dir=str(d7p_small_train.parent),
        condition="mel,nv",
        guidance_scale=[4.0],
        num_inference_steps=[4],
        strength=0.75,
        keep="lesion",
        keep_margin=2,
        device="cpu",
        resolution=64,
        scheduler="flow_euler" if flow else "dpmsolver++",
        contact_sheet=0,
    )
    result = generate(cfg)
    with open(tmp_path / "edit" / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert result.planned == 4 and len(rows) >= 3  # the analyzer may find no lesion in one; it is then skipped
    pipe = load_model(cfg, "cpu")
    editor = Editor(pipe, cfg)
    assert editor.pipe.get_active_adapters() and type(editor.pipe).__name__ == FAMILIES[family_name].image_pipeline
    for r in rows:
        given = editor.prepare(r["source"])
        made = np.asarray(Image.open(tmp_path / "edit" / r["file_name"]).convert("RGB"), np.float32)
        change = np.abs(made - np.asarray(given.image, np.float32))
        assert change[given.keep].max() == 0 and float(r["lesion_change"]) == 0.0
        assert change[~given.keep].mean() > 2  # the skin around it was edited
        assert r["strength"] == "0.75" and r["skin_ita_before"] != "" and Path(r["source"]).is_file()

    given = editor.prepare(rows[0]["source"])
    prompt = ["a dermoscopic image"]

    def latents(strength: float, keep: bool) -> tuple[torch.Tensor, object]:
        kwargs = pipeline_inputs(editor.pipe, [given], [0], strength)
        callback = kwargs["callback_on_step_end"]
        if not keep:
            kwargs = {k: v for k, v in kwargs.items() if not k.startswith("callback")}
        steps, g = 20, torch.Generator().manual_seed(0)
        out = editor.pipe(prompt, num_inference_steps=steps, generator=g, output_type="latent", **kwargs).images
        return out, callback

    blended, callback = latents(0.75, keep=True)
    free, _ = latents(0.75, keep=False)
    inside = callback.mask
    assert torch.equal(blended[inside], callback.known[inside])
    assert not torch.allclose(free[inside], callback.known[inside], atol=1e-2)
    near = (latents(0.05, keep=False)[0] - callback.known).abs().mean()
    far = (latents(1.0, keep=False)[0] - callback.known).abs().mean()
    assert near < far / 3, (near, far)
