"""The training loop on the tiny model: LoRA and full+EMA results load as users load them, resume is exact,
caching changes nothing, and bad input stops with a one-line error."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import RunsCode, failing_compiler, oversized_png, perturbed_copy, small_config, truncated_jpeg
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import lesiongen.diffusion.loss as loss_module
import lesiongen.diffusion.train as train_module
from lesiongen.cli import parse_config
from lesiongen.devices import adamw, compiler_missing
from lesiongen.diffusion.checkpoints import TRAINING_STATE
from lesiongen.diffusion.config import DEFAULT_TRAIN_STEPS, total_steps
from lesiongen.diffusion.dataset import ImageCaptionDataset, PlannedBatches, collate, item_caption, read_examples
from lesiongen.diffusion.families import denoiser, prompt_encoder, tokenize
from lesiongen.diffusion.latent_cache import CachedLatentDataset, CacheLayout, build_shards
from lesiongen.diffusion.loss import batch_loss, diffusion_loss
from lesiongen.diffusion.pipeline import is_lora_dir, load_training_parts, lora_base_model
from lesiongen.diffusion.train import TrainConfig, main, train
from lesiongen.errors import InputError
from lesiongen.states import read_state

REPO = Path(__file__).resolve().parents[1]


def image(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("melanoma, dermoscopic image", num_inference_steps=3, generator=g, output_type="np").images[0]


# --- LoRA -------------------------------------------------------------------------------------------


def test_lora_run_writes_weights_checkpoints_card_validation_and_logs(tiny_lora_run, tiny_sd_dir, d7p_small_train):
    out = tiny_lora_run
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert is_lora_dir(out) and lora_base_model(out) == str(tiny_sd_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    record = json.loads((out / "config.json").read_text())
    base = os.path.relpath(tiny_sd_dir, out)  # the folder carries no machine path: the base relative to it
    assert record["global_step"] == 6 and record["pretrained_model_name_or_path"] == base
    assert record["config"]["rank"] == 4 and record["effective_batch"] == 4
    card = (out / "README.md").read_text()
    assert f"from_pretrained('{base}'" in card and "concept" in card and "`snr_gamma` | `5.0`" in card
    assert str(tiny_sd_dir.parent) not in card + (out / "config.json").read_text()
    grid = Image.open(out / "validation" / "step-000006.png")
    n_labels = len(
        {json.loads(line)["label"] for line in (d7p_small_train / "metadata.jsonl").read_text().splitlines()}
    )
    assert n_labels >= 4
    assert grid.size == (min(n_labels, 4) * 64, -(-n_labels // 4) * 64)  # one prompt per label, 4 per row
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # LoRA checkpoints hold the adapter, not the frozen base UNet.
    saved = load_file(out / "checkpoint-6" / "model.safetensors")
    assert saved and all("lora" in k for k in saved)


def test_lora_loads_with_stock_load_lora_weights_and_changes_output(tiny_lora_run, tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = image(pipe)
    pipe.load_lora_weights(str(tiny_lora_run))
    after = image(pipe)
    assert np.abs(before - after).mean() > 1e-3
    # The reloaded adapter is the trained one: the final checkpoint's LoRA weights drive the same UNet.
    trained = load_file(tiny_lora_run / "checkpoint-6" / "model.safetensors")
    live = {k: v for k, v in pipe.unet.state_dict().items() if "lora" in k}
    assert len(live) == len(trained)

    def plain(key):
        return re.sub(r"\.lora_([AB])\.[^.]+\.weight$", r".lora_\1.weight", key)

    live = {plain(k): v for k, v in live.items()}
    for key, value in trained.items():
        assert torch.allclose(live[plain(key)], value), key


# --- full UNet + EMA + text encoder ------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tiny_sd_dir, d7p_small_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full"
    cfg = small_config(
        tiny_sd_dir,
        d7p_small_train,
        out,
        mode="full",
        use_ema=True,
        ema_decay=0.9,
        train_text_encoder=True,
        gradient_checkpointing=True,
        max_train_steps=24,
        checkpointing_steps=24,
        train_batch_size=4,
        learning_rate=2e-3,
    )
    return out, train(cfg)


def test_full_run_loss_falls(full_run):
    _, result = full_run
    first, last = np.mean(result.losses[:6]), np.mean(result.losses[-6:])
    assert result.global_step == 24 and len(result.losses) == 24
    assert last < 0.8 * first, (first, last)


def test_full_run_saves_pipeline_with_ema_weights(full_run, tiny_sd_dir):
    out, _ = full_run
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ckpt = out / "checkpoint-24"
    ema_state = read_state(ckpt / TRAINING_STATE, "")["ema"]
    raw = load_file(ckpt / "model.safetensors")
    saved = list(pipe.unet.parameters())
    assert len(saved) == len(ema_state["shadow_params"])
    assert all(torch.allclose(p, s) for p, s in zip(saved, ema_state["shadow_params"], strict=True))
    raw_unet = dict(pipe.unet.named_parameters())
    assert any(not torch.allclose(raw_unet[k], v) for k, v in raw.items() if k in raw_unet), (
        "EMA weights were not swapped in"
    )
    text = load_file(ckpt / "model_1.safetensors")
    live = pipe.text_encoder.state_dict()
    assert all(torch.equal(live[k], v) for k, v in text.items())
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    base.set_progress_bar_config(disable=True)
    again = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(image(pipe), image(again))
    assert not np.allclose(image(pipe), image(base))


# --- resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_after_crash_matches_uninterrupted(mode, tiny_sd_dir, d7p_small_train, tmp_path, monkeypatch):
    extra = {"mode": "full", "use_ema": True, "ema_decay": 0.9} if mode == "full" else {}
    whole = train(small_config(tiny_sd_dir, d7p_small_train, tmp_path / "whole", **extra))

    crashed = small_config(tiny_sd_dir, d7p_small_train, tmp_path / "crashed", **extra)
    real_loss, calls = train_module.batch_loss, {"n": 0}

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(crashed)
    monkeypatch.setattr(train_module, "batch_loss", real_loss)
    assert [p.name for p in (tmp_path / "crashed").glob("checkpoint-*")] == ["checkpoint-2"]
    half_written = tmp_path / "crashed" / ".checkpoint-4.abc123.tmp"
    half_written.mkdir()
    resumed = train(replace(crashed, resume_from_checkpoint="latest"))
    assert resumed.global_step == 4 and len(resumed.losses) == 2
    assert np.allclose(resumed.losses, whole.losses[2:], rtol=1e-5)
    assert not half_written.exists()

    if mode == "lora":
        a = load_file(tmp_path / "whole" / "pytorch_lora_weights.safetensors")
        b = load_file(tmp_path / "crashed" / "pytorch_lora_weights.safetensors")
    else:
        a = load_file(tmp_path / "whole" / "unet" / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "crashed" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_changed_architecture_and_missing_checkpoints(
    tiny_lora_run, tiny_sd_dir, d7p_small_train, tmp_path
):
    cfg = small_config(tiny_sd_dir, d7p_small_train, tiny_lora_run, resume_from_checkpoint="latest", rank=8)
    with pytest.raises(InputError, match="--rank.*trained with 4"):
        train(cfg)
    with pytest.raises(InputError, match="no complete checkpoint"):
        train(small_config(tiny_sd_dir, d7p_small_train, tmp_path / "empty", resume_from_checkpoint="latest"))
    with pytest.raises(InputError, match="not a checkpoint-<step> folder"):
        train(small_config(tiny_sd_dir, d7p_small_train, tmp_path, resume_from_checkpoint=str(tmp_path)))


def test_resume_never_unpickles_what_a_checkpoint_folder_holds(tiny_lora_run, tiny_sd_dir, d7p_small_train, tmp_path):
    """accelerate reads custom_checkpoint_*.pkl with full unpickling; an earlier version's (or a crafted)
    checkpoint holding one is refused before anything in it is read."""
    out = tmp_path / "old"
    shutil.copytree(tiny_lora_run / "checkpoint-3", out / "checkpoint-3")
    (out / "checkpoint-3" / TRAINING_STATE).unlink(missing_ok=True)
    marker = tmp_path / "code-ran"
    torch.save(RunsCode(marker), out / "checkpoint-3" / "custom_checkpoint_0.pkl")
    cfg = small_config(tiny_sd_dir, d7p_small_train, out, resume_from_checkpoint="latest", lora_alpha=8)
    with pytest.raises(
        InputError, match=r"checkpoint-3: has no training_state.*custom_checkpoint_\*.pkl.*not unpickle"
    ):
        train(cfg)
    assert not marker.exists()


def test_a_lora_records_its_resolved_base_and_never_runs_on_another(
    tiny_sd_dir, d7p_small_train, tmp_path, monkeypatch, capsys
):
    """Issue 15: the base typed as a relative path was recorded as typed, and generation from another folder,
    where that path names another model, loaded that model without a word. Issue 31: the base is recorded
    relative to the LoRA folder, and --allow_base_mismatch loads another base of the family with a warning."""
    from lesiongen.diffusion.fingerprint import fingerprint
    from lesiongen.diffusion.generate import main as generate_main
    from lesiongen.diffusion.pipeline import load_pipeline, model_identity

    first, second, lora = tmp_path / "first", tmp_path / "second", tmp_path / "lora"
    shutil.copytree(tiny_sd_dir, first / "base")
    perturbed_copy(tiny_sd_dir, second / "base")
    monkeypatch.chdir(first)
    train(small_config("base", d7p_small_train, lora, max_train_steps=1, checkpointing_steps=1))
    record = json.loads((lora / "config.json").read_text())
    assert record["pretrained_model_name_or_path"] == "../first/base"  # relative to the LoRA folder
    assert record["base_fingerprint"] == fingerprint(str(first / "base")) != fingerprint(str(second / "base"))

    monkeypatch.chdir(second)  # here "base" is another model
    pipe = load_pipeline(lora, device="cpu")
    trained_on = load_file(first / "base" / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], trained_on)
    with pytest.raises(
        InputError, match=r"--base_model base: is not the model .* was trained on.*--allow_base_mismatch"
    ):
        load_pipeline(lora, base_model="base", device="cpu")
    capsys.readouterr()
    pipe = load_pipeline(lora, base_model="base", device="cpu", allow_base_mismatch=True)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warned) == 1 and "--allow_base_mismatch" in warned[0] and "is not the model" in warned[0]
    mismatched = load_file(second / "base" / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], mismatched)
    identity = model_identity(str(lora), "base")  # what generation_config.json records
    assert identity["base_mismatch"] and identity["trained_base_fingerprint"] == record["base_fingerprint"]
    assert not model_identity(str(lora))["base_mismatch"]
    gen = ["--model_path", str(lora), "--base_model", "base", "--condition", "mel", "--output_dir", "gen"]
    gen += ["--num_inference_steps", "2", "--guidance_scale", "3", "--contact_sheet", "0", "--device", "cpu"]
    assert generate_main(gen) == 2  # refused without the flag
    assert generate_main([*gen, "--allow_base_mismatch"]) == 0
    run_record = json.loads((second / "gen" / "single" / "generation_config.json").read_text())
    assert run_record["model"]["base_mismatch"] and run_record["config"]["allow_base_mismatch"]
    # a LoRA of another family is refused even so
    other = tmp_path / "other_family"
    shutil.copytree(lora, other, ignore=shutil.ignore_patterns("checkpoint-*"))
    (other / "config.json").write_text(json.dumps({**record, "model_family": "sdxl"}))
    with pytest.raises(InputError, match=r"is a sd1 model and .* is a sdxl LoRA; --allow_base_mismatch allows"):
        load_pipeline(other, base_model="base", device="cpu", allow_base_mismatch=True)
    # moved together, the LoRA finds its base through the relative record
    moved = tmp_path / "moved"
    shutil.copytree(first / "base", moved / "first" / "base")
    shutil.copytree(lora, moved / "lora", ignore=shutil.ignore_patterns("checkpoint-*"))
    assert lora_base_model(moved / "lora") == str(moved / "first" / "base")
    resume = small_config("base", d7p_small_train, lora, max_train_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(InputError, match=r"--pretrained_model_name_or_path base: has fingerprint .* checkpoint-1"):
        train(resume)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_sd_dir, d7p_small_train, tmp_path, monkeypatch):
    real, calls = loss_module.diffusion_loss, {"n": 0}

    def nan_from_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(loss_module, "diffusion_loss", nan_from_step_3)
    with pytest.raises(InputError, match="step 3: loss is nan.*kept checkpoint-2"):
        train(small_config(tiny_sd_dir, d7p_small_train, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


# --- latent cache -----------------------------------------------------------------------------------


def test_cached_and_uncached_latents_give_the_same_loss(tiny_sd_dir, d7p_small_train, tmp_path):
    parts = load_training_parts(tiny_sd_dir)
    examples = read_examples(d7p_small_train, [parts["tokenizer"]])[:4]
    images = ImageCaptionDataset(examples, [parts["tokenizer"]], 64, center_crop=True)
    layout = CacheLayout(tmp_path, "key", len(examples), shard_size=3, with_text=True)
    build_shards(layout, images, parts["vae"], prompt_encoder(parts), torch.float32, batch_size=2)
    cached = CachedLatentDataset(layout, examples, None)
    plans = (PlannedBatches(4, 4, 4, 0, True, 0.3).step_items(s) for s in range(100))
    keys = next(k for k in plans if len({flip for _, flip, _, _ in k}) == 2 and any(drop for _, _, drop, _ in k))
    batches = collate([images[k] for k in keys]), collate([cached[k] for k in keys])
    assert "pixel_values" in batches[0] and "latent_params" in batches[1] and "prompt_embeds" in batches[1]
    losses = []
    for batch in batches:
        with torch.no_grad():
            losses.append(
                batch_loss(
                    batch,
                    parts["unet"],
                    parts["vae"],
                    denoiser(parts["family"], [parts["text_encoder"]], parts["vae"]),
                    parts["noise_scheduler"],
                    0,
                    5.0,
                    0.05,
                )
            )
    assert torch.allclose(losses[0], losses[1], rtol=1e-4), losses
    # Flips are cached as two different latents, not one mirrored latent.
    unflipped, flipped = (cached.item_tensors(0, flip)[0]["latent_params"] for flip in (False, True))
    assert not torch.allclose(flipped, torch.flip(unflipped, dims=[-1]), atol=1e-3)


def test_tag_dropout_keeps_the_diagnosis_and_leaves_out_the_other_parts_item_by_item():
    text = "a dermoscopic image of melanoma, with a blue-whitish veil and irregular streaks, on the back, light skin"
    parts = text.split(", ")
    captions = [item_caption(text, (0, False, False, item), 7, 0.3) for item in range(400)]
    assert all(c.startswith(parts[0]) for c in captions)
    assert all(set(c.split(", ")) <= set(parts) for c in captions)
    kept = sum(len(c.split(", ")) - 1 for c in captions) / (400 * (len(parts) - 1))
    assert 0.63 < kept < 0.77  # each later part kept with probability 0.7
    assert captions[5] == item_caption(text, (3, True, False, 5), 7, 0.3)  # a pure function of seed and item
    assert captions != [item_caption(text, (0, False, False, item), 8, 0.3) for item in range(400)]
    assert item_caption(text, (0, False, True, 1), 7, 0.3) == ""  # a dropped caption stays empty
    assert item_caption(text, (0, False, False, 1), 7, 0.0) == text


def test_cached_and_uncached_items_tokenize_the_same_tag_dropped_captions(tiny_sd_dir, d7p_small_train, tmp_path):
    parts = load_training_parts(tiny_sd_dir)
    tokenizers = [parts["tokenizer"]]
    examples = read_examples(d7p_small_train, tokenizers)[:4]
    images = ImageCaptionDataset(examples, tokenizers, 64, center_crop=True, tag_dropout=0.5, seed=3)
    layout = CacheLayout(tmp_path, "key", len(examples), shard_size=4, with_text=False)
    build_shards(layout, images, parts["vae"], None, torch.float32, batch_size=4)
    cached = CachedLatentDataset(layout, examples, tokenizers, tag_dropout=0.5, seed=3)
    keys = [k for s in range(20) for k in PlannedBatches(4, 4, 4, 3, True, 0.1).step_items(s)]
    ids = [(images[k]["input_ids"], cached[k]["input_ids"]) for k in keys]
    assert all(torch.equal(a, b) for a, b in ids)
    whole = [tokenize(tokenizers, [e.text])["input_ids"][0] for e in examples]
    shortened = [not torch.equal(a, whole[k[0]]) for k, (a, _) in zip(keys, ids, strict=True) if not k[2]]
    assert sum(shortened) > len(shortened) // 2  # most kept captions lost a part


def test_the_training_optimiser_is_fused_on_a_cpu_and_steps_as_per_tensor_adamw():
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    fused_params = [torch.nn.Parameter(t.clone()) for t in start]
    plain_params = [torch.nn.Parameter(t.clone()) for t in start]
    fused = adamw(fused_params, "cpu", lr=1e-2, weight_decay=1e-2)
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=1e-2, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        grads = [torch.randn_like(t) for t in start]
        for params, optimizer in ((fused_params, fused), (plain_params, plain)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b, s in zip(fused_params, plain_params, start, strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, s)


def test_torch_compile_auto_compiles_only_work_long_enough_to_repay_it(monkeypatch):
    import lesiongen.devices as devices

    cfg = TrainConfig(report_to="none")
    assert cfg.torch_compile == "auto" and total_steps(cfg, 10, 1) >= train_module.COMPILE_AFTER_STEPS  # the recipe
    monkeypatch.setattr(devices, "compiler_missing", lambda device: None)
    with torch._dynamo.config.patch(suppress_errors=False):
        assert devices.compile_choice("auto", 2000, 2000, "steps", "cpu")[0]
        assert torch._dynamo.config.suppress_errors  # auto falls back to eager on a compile error
    with torch._dynamo.config.patch(suppress_errors=False):
        assert devices.compile_choice("true", 10, 2000, "steps", "cpu")[0]
        assert not torch._dynamo.config.suppress_errors  # an explicit true lets the error stop the run
    on, why = devices.compile_choice("auto", 1999, 2000, "steps", "cpu")
    assert not on and why == "auto: 1999 steps, fewer than the 2000 that repay compiling"
    assert not devices.compile_choice("false", 10**6, 2000, "steps", "cpu")[0]
    monkeypatch.setattr(devices, "compiler_missing", lambda device: "triton is not installed")
    assert devices.compile_choice("auto", 10**6, 2000, "steps", "cuda") == (False, "auto: triton is not installed")
    assert parse_config(TrainConfig, ["--torch_compile"]).torch_compile == "true"  # the bare flag, as diffusers'
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--torch_compile", "maybe"])


def test_checkpointing_that_keeps_attention_runs_each_attention_once_and_gives_the_same_gradients(tiny_sd_dir):
    from diffusers import UNet2DConditionModel
    from torch.utils._python_dispatch import TorchDispatchMode

    class AttentionCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket.__name__ in train_module.ATTENTION_OPS
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 7, 64)
    grads, calls = [], []
    for checkpointing in (None, train_module.checkpoint_keeping_attention):
        unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
        unet.enable_gradient_checkpointing(checkpointing)
        unet.train()
        with AttentionCalls() as counter:
            unet(x, t, text).sample.square().mean().backward()
        calls.append(counter.count)
        grads.append([p.grad for p in unet.parameters()])
    layers = sum(1 for name, _ in unet.named_modules() if name.endswith((".attn1", ".attn2")))
    assert calls == [2 * layers, layers]  # recomputed in backward, or kept
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_cpu_without_a_cxx_compiler_is_reported_as_missing_one():
    import torch._inductor.config as inductor

    assert compiler_missing("cpu") is None  # this machine has g++
    with inductor.patch({"cpp.cxx": ("no-such-c++",)}):
        assert compiler_missing("cpu").startswith("no C++ compiler was found")


def test_a_compiler_that_fails_under_auto_leaves_the_run_training_eagerly(
    tiny_sd_dir, d7p_small_train, tmp_path, monkeypatch
):
    import lesiongen.diffusion.attention as attention

    tried, padded = failing_compiler(monkeypatch), []
    pad = attention.pad_cross_attention_keys
    monkeypatch.setattr(attention, "pad_cross_attention_keys", lambda *a: padded.append(pad(*a)) or padded[-1])
    monkeypatch.setattr(train_module, "COMPILE_AFTER_STEPS", 2)
    cfg = small_config(tiny_sd_dir, d7p_small_train, tmp_path / "out", max_train_steps=2, checkpointing_steps=10)
    with torch._dynamo.config.patch(suppress_errors=False):
        result = train(cfg)
    assert tried and result.global_step == 2 and all(math.isfinite(x) for x in result.losses)
    assert len(padded) == 1 and padded[0] > 0  # the compiled path pads the text keys, eagerly run here
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_class_balanced_plans_draw_a_rare_class_as_often_as_a_common_one():
    weights = tuple([1 / 9] * 9 + [1.0])  # nine images of one class, one of another
    plans = [PlannedBatches(10, 5, 5, 3, True, 0.0, weights=weights).step_items(s) for s in range(400)]
    assert plans[7] == PlannedBatches(10, 5, 5, 3, True, 0.0, weights=weights).step_items(7)
    rare = sum(index == 9 for items in plans for index, *_ in items) / (400 * 5)
    assert 0.42 < rare < 0.58
    plain = [PlannedBatches(10, 5, 5, 3, True, 0.0).step_items(s) for s in range(400)]
    assert sum(index == 9 for items in plain for index, *_ in items) / (400 * 5) == pytest.approx(0.1)


def test_balance_classes_refuses_rows_without_a_label(tiny_sd_dir, d7p_small_train, tmp_path):
    rows = [json.loads(line) for line in (d7p_small_train / "metadata.jsonl").read_text().splitlines()]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for row in rows:
        (data / row["file_name"]).symlink_to((d7p_small_train / row["file_name"]).resolve())
    rows[3].pop("label")
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match="--balance_classes: 1 metadata rows have no label .*line 4"):
        train(small_config(tiny_sd_dir, data, tmp_path / "out", balance_classes=True))


def test_freeze_token_embedding_trains_the_rest_of_the_text_encoder(tiny_sd_dir, d7p_small_train, tmp_path):
    from transformers import CLIPTextModel

    out = tmp_path / "full"
    cfg = small_config(
        tiny_sd_dir,
        d7p_small_train,
        out,
        mode="full",
        train_text_encoder=True,
        freeze_token_embedding=True,
        balance_classes=True,
        max_train_steps=2,
    )
    train(cfg)
    before = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder")
    after = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
    assert torch.equal(before.get_input_embeddings().weight, after.get_input_embeddings().weight)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any("encoder.layers" in k for k in changed)
    with pytest.raises(InputError, match="--freeze_token_embedding: needs --train_text_encoder"):
        small_config(tiny_sd_dir, d7p_small_train, out, mode="full", freeze_token_embedding=True)


def test_any_micro_batch_trains_the_same_weights(tiny_sd_dir, d7p_small_train, tmp_path):
    """Noise is drawn per image and items are planned per step, so 4 x 1, 1 x 4, 2 x 2 and auto give one result."""
    runs = {
        "4x1": dict(train_batch_size=4, gradient_accumulation_steps=1),
        "1x4": dict(train_batch_size=1, gradient_accumulation_steps=4),
        "1x4 as 2": dict(train_batch_size=1, gradient_accumulation_steps=4, micro_batch_size="2"),
        "1x4 auto": dict(train_batch_size=1, gradient_accumulation_steps=4, micro_batch_size="auto"),
    }
    weights, losses = {}, {}
    for name, settings in runs.items():
        out = tmp_path / name.replace(" ", "_")
        cfg = small_config(
            tiny_sd_dir, d7p_small_train, out, max_train_steps=2, checkpointing_steps=10, cache_dir=str(tmp_path / "c")
        )
        losses[name] = train(replace(cfg, **settings)).losses
        weights[name] = load_file(out / "pytorch_lora_weights.safetensors")
        assert json.loads((out / "config.json").read_text())["effective_batch"] == 4
    first = weights["4x1"]
    for name in runs:
        assert np.allclose(losses[name], losses["4x1"], rtol=1e-5), (name, losses[name], losses["4x1"])
        # Batched kernels round differently; Adam's normalisation lifts that to ~1e-5 on near-zero gradients.
        assert all(torch.allclose(weights[name][k], first[k], atol=5e-5) for k in first), name
    assert json.loads((tmp_path / "1x4_as_2" / "config.json").read_text())["micro_batch"] == 2


def test_num_train_epochs_derives_the_steps_as_diffusers_does_and_max_train_steps_wins(
    tiny_sd_dir, d7p_small_train, tmp_path, capsys
):
    """diffusers: steps = epochs x ceil(batches per process / accumulation); given both, max_train_steps wins."""
    epochs = replace(small_config(tiny_sd_dir, d7p_small_train, tmp_path), max_train_steps=None, num_train_epochs=3)
    assert total_steps(epochs, 10, 2) == 3 * 3  # ceil(10 / (2 x 2)) = 3 batches per process, 1 step each
    assert total_steps(replace(epochs, gradient_accumulation_steps=2), 10, 2) == 3 * 2  # ceil(3 / 2) steps
    assert total_steps(replace(epochs, num_train_epochs=None), 10, 1) == DEFAULT_TRAIN_STEPS
    one_epoch = replace(epochs, num_train_epochs=1, gradient_accumulation_steps=2, output_dir=str(tmp_path / "e"))
    n = len((d7p_small_train / "metadata.jsonl").read_text().splitlines())
    assert train(one_epoch).global_step == math.ceil(math.ceil(n / 2) / 2)  # batches of 2, accumulated 2 by 2
    record = json.loads((tmp_path / "e" / "config.json").read_text())
    assert record["config"]["num_train_epochs"] == 1 and record["config"]["max_train_steps"] is None
    assert "wins" not in capsys.readouterr().out
    both = replace(one_epoch, max_train_steps=2, output_dir=str(tmp_path / "both"))
    assert train(both).global_step == 2
    notes = [line for line in capsys.readouterr().out.splitlines() if "wins" in line]
    assert notes == ["note: --max_train_steps 2 wins over --num_train_epochs 1"]


def test_min_snr_weighting_matches_hand_computation(tiny_sd_dir):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([10, 900])
    alpha_bar = sched.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    expected = (torch.clamp(snr, max=5.0) / snr).mean()
    assert torch.allclose(diffusion_loss(pred, target, t, sched, 5.0), expected)
    assert diffusion_loss(pred, target, t, sched, None).item() == 1.0


# --- configuration and bad input ---------------------------------------------------------------------


def test_flags_parse_in_diffusers_spelling_and_combinations_are_checked():
    cfg = parse_config(
        TrainConfig,
        [
            "--pretrained-model-name-or-path",
            "m",
            "--mode",
            "full",
            "--use_ema",
            "--validation_prompts",
            "a",
            "b",
            "--snr_gamma",
            "none",
        ],
    )
    assert cfg.pretrained_model_name_or_path == "m" and cfg.use_ema and cfg.validation_prompts == ["a", "b"]
    assert cfg.snr_gamma is None
    for ok in (["--mode", "full", "--train_text_encoder"], ["--cache_latents", "false", "--center_crop", "false"]):
        assert parse_config(TrainConfig, [*ok, "--tag_dropout", "0.3"]).tag_dropout == 0.3
    for argv, flag in [
        (["--train_text_encoder"], "--train_text_encoder"),
        (["--center_crop", "false"], "--center_crop"),
        (["--resolution", "100"], "--resolution"),
        (["--caption_dropout", "1.5"], "--caption_dropout"),
        (["--tag_dropout", "1"], "--tag_dropout"),
        (["--tag_dropout", "0.3"], "--tag_dropout: varies each caption per step"),  # LoRA, cached text embeddings
        (["--train_batch_size", "2", "--gradient_accumulation_steps", "3", "--micro_batch_size", "4"], "--micro_batch"),
        (["--micro_batch_size", "big"], "--micro_batch_size"),
        (["--cache_shard_size", "0"], "--cache_shard_size"),
        (["--num_train_epochs", "0"], "--num_train_epochs: must be at least 1"),
        (["--max_train_steps", "0"], "--max_train_steps: must be at least 1"),
    ]:
        with pytest.raises(InputError, match=flag):
            parse_config(TrainConfig, argv)


def write_folder(folder: Path, rows: list[dict], images: dict[str, bytes | None]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in images.items():
        if content is None:
            Image.new("RGB", (80, 64), (200, 120, 90)).save(folder / name)
        else:
            (folder / name).write_bytes(content)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_image", "row 2: image .*b.png not found"),
        ("corrupt_image", "row 1: image .*a.png cannot be read"),
        ("empty", "no training examples"),
        ("long_caption", "row 1: caption has \\d+ tokens, more than the text encoder's 77"),
        ("no_metadata", "no metadata.jsonl"),
    ],
)
def test_bad_data_is_reported_with_row_and_fix(case, match, tmp_path, tiny_sd_dir):
    folder = tmp_path / "data"
    if case == "missing_image":
        write_folder(
            folder, [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}], {"a.png": None}
        )
    elif case == "corrupt_image":
        write_folder(folder, [{"file_name": "a.png", "text": "x"}], {"a.png": b"not a png"})
    elif case == "empty":
        write_folder(folder, [], {})
    elif case == "long_caption":
        write_folder(folder, [{"file_name": "a.png", "text": "melanoma " * 90}], {"a.png": None})
    else:
        folder.mkdir()
    with pytest.raises(InputError, match=match):
        train(small_config(tiny_sd_dir, folder, tmp_path / "out"))


@pytest.mark.parametrize("damage", ["truncated", "oversized"])
def test_an_uncached_run_stops_on_a_damaged_image_with_one_line(damage, tmp_path, capsys, tiny_sd_dir, d7p_images):
    """A truncated JPEG passes Image.verify() and used to kill an uncached run mid-way inside the DataLoader;
    an oversized PNG decodes to gigabytes. Both stop before training, as one line naming the row."""
    folder = tmp_path / "data"
    rows = [{"file_name": "a.png", "text": "melanoma"}, {"file_name": "b.jpg", "text": "nevus"}]
    write_folder(folder, rows, {"a.png": None})
    if damage == "truncated":
        truncated_jpeg(next(d7p_images.rglob("*.jpg")), folder / "b.jpg")
    else:
        oversized_png(folder / "b.jpg")  # the suffix lies; the decoder finds the PNG
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_dir), "--train_data_dir", str(folder)]
    argv += ["--output_dir", str(tmp_path / "out"), "--resolution", "64", "--cache_latents", "false"]
    argv += ["--max_train_steps", "2", "--validation_steps", "0", "--report_to", "none", "--train_batch_size", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err  # above the error: transformers' "Loading weights" progress bar
    assert "Traceback" not in err and err.endswith("\n") and err.splitlines()[-1].startswith("error: ")
    assert "metadata.jsonl row 2: image" in err.splitlines()[-1]
    assert ("truncated" if damage == "truncated" else "exceeds the limit") in err.splitlines()[-1]


def test_missing_model_path_is_one_line_exit_2(tmp_path, capsys, d7p_small_train):
    code = main(["--pretrained_model_name_or_path", str(tmp_path / "nope"), "--train_data_dir", str(d7p_small_train)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "model directory not found" in err


def test_uncached_lora_run_with_random_crop(tiny_sd_dir, d7p_small_train, tmp_path):
    cfg = small_config(
        tiny_sd_dir, d7p_small_train, tmp_path / "u", cache_latents=False, center_crop=False, max_train_steps=2
    )
    result = train(cfg)
    assert result.global_step == 2 and all(np.isfinite(result.losses))
    assert not (tmp_path / "u" / "latent_cache").exists()
    assert (tmp_path / "u" / "pytorch_lora_weights.safetensors").is_file()


# --- several processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_train_lora_sh_on_two_cpu_processes_has_world_size_2_and_saves_once(tiny_sd_dir, d7p_small_train, tmp_path):
    """TOOLCHAIN.md: `accelerate launch --cpu` does not distribute; the multi-GPU launcher with ACCELERATE_USE_CPU=1
    does (gloo). external/cpu_2proc.yaml is that launcher as a config file, driven through train_lora.sh."""
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_CONFIG": "external/cpu_2proc.yaml",
        "ACCELERATE_LAUNCH_ARGS": f"--main_process_port {free_port()}",
        "ACCELERATE": str(Path(sys.executable).with_name("accelerate")),
        "MODEL_NAME": str(tiny_sd_dir),
        "TRAIN_DATA_DIR": str(d7p_small_train),
        "OUTPUT_DIR": str(out),
        "RESOLUTION": "64",
        "LORA_RANK": "4",
        "MIXED_PRECISION": "no",
        "GRADIENT_ACCUMULATION_STEPS": "1",
        "MAX_TRAIN_STEPS": "3",
        "CHECKPOINTING_STEPS": "3",
    }
    extra = [
        "--learning_rate",
        "1e-3",
        "--validation_steps",
        "0",
        "--report_to",
        "none",
        "--gradient_checkpointing",
        "false",
        "--cache_shard_size",
        "2",
    ]
    proc = subprocess.run(
        ["bash", "train_lora.sh", *extra], env=env, capture_output=True, text=True, timeout=400, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), effective batch 2" in proc.stdout
    # Each rank encoded its own shards (0, 2, 4, ... and 1, 3, ...), two images each; both read all of them.
    n_images = len((d7p_small_train / "metadata.jsonl").read_text().splitlines())
    n_shards = -(-n_images // 2)
    assert len(list((out / "latent_cache").glob(f"shard-*-of-{n_shards:05d}.safetensors"))) == n_shards
    assert proc.stdout.count("saved lora model") == 1
    record = json.loads((out / "config.json").read_text())
    assert record["num_processes"] == 2 and record["config"]["rank"] == 4 and record["config"]["learning_rate"] == 1e-3
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert (out / "checkpoint-3" / "random_states_1.pkl").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigkill_then_resume_latest_matches_uninterrupted(tiny_sd_dir, d7p_small_train, tmp_path):
    """A real kill -9 after the first checkpoint; `--resume_from_checkpoint latest` ends on the same weights."""
    import signal
    import time

    whole = small_config(tiny_sd_dir, d7p_small_train, tmp_path / "whole", max_train_steps=8)
    train(whole)
    killed = replace(whole, output_dir=str(tmp_path / "killed"))
    argv = [sys.executable, "-m", "lesiongen.diffusion.train"]
    for name, value in vars(killed).items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "pytorch_lora_weights.safetensors").exists()
    resumed = train(replace(killed, resume_from_checkpoint="latest"))
    assert resumed.global_step == 8
    a = load_file(tmp_path / "whole" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "killed" / "pytorch_lora_weights.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_train_sd_sh_single_cpu_process_saves_a_full_pipeline(tiny_sd_dir, d7p_small_train, tmp_path):
    """train_SD.sh as a user runs it (env overrides, extra flags win), on external/cpu.yaml."""
    out = tmp_path / "sd"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_CONFIG": str(REPO / "external" / "cpu.yaml"),
        "ACCELERATE": str(Path(sys.executable).with_name("accelerate")),
        "MODEL_NAME": str(tiny_sd_dir),
        "TRAIN_DATA_DIR": str(d7p_small_train),
        "OUTPUT_DIR": str(out),
        "RESOLUTION": "64",
        "MIXED_PRECISION": "no",
        "GRADIENT_ACCUMULATION_STEPS": "2",
        "MAX_TRAIN_STEPS": "2",
    }
    extra = [
        "--train_text_encoder",
        "--validation_steps",
        "0",
        "--report_to",
        "none",
        "--gradient_checkpointing",
        "false",
    ]
    proc = subprocess.run(
        ["bash", str(REPO / "train_SD.sh"), *extra], env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "config.json").read_text())["config"]
    assert record["mode"] == "full" and record["use_ema"] and record["train_text_encoder"]
    assert record["learning_rate"] == 1e-5 and record["max_grad_norm"] == 1.0 and record["seed"] == 42
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.unet.config.sample_size == 16
