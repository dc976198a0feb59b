"""Model loading: hub id vs directory, LoRA dir vs pipeline dir, LoRA save/load at the right scale."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from builders import perturbed_copy
from diffusers import StableDiffusionPipeline

from lesiongen.diffusion.fingerprint import fingerprint
from lesiongen.diffusion.pipeline import (
    add_lora,
    base_identity,
    is_lora_dir,
    load_pipeline,
    load_training_parts,
    resolve_model,
    save_lora,
)
from lesiongen.errors import InputError


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample


@pytest.fixture(scope="module")
def trained_like_lora(tiny_sd_dir, tmp_path_factory):
    """A LoRA with rank != alpha and non-zero weights (as if trained), saved with its base recorded."""
    parts = load_training_parts(tiny_sd_dir)
    unet = parts["unet"]
    config = add_lora(unet, rank=4, alpha=8, seed=0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path_factory.mktemp("lora") / "lora"
    save_lora(unet, config, out)
    record = {"pretrained_model_name_or_path": str(tiny_sd_dir), **base_identity(str(tiny_sd_dir))}
    (out / "config.json").write_text(json.dumps(record))
    return out, unet_output(unet)


def test_fingerprint_tells_weights_apart_and_ignores_bookkeeping(tiny_sd_dir, tmp_path):
    same = tmp_path / "same"
    shutil.copytree(tiny_sd_dir, same)
    config = json.loads((same / "unet" / "config.json").read_text())
    (same / "unet" / "config.json").write_text(json.dumps({**config, "_diffusers_version": "9.9.9"}))
    (same / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant a cache may hold")
    assert fingerprint(str(same)) == fingerprint(str(tiny_sd_dir))
    assert fingerprint(str(perturbed_copy(tiny_sd_dir, tmp_path / "other"))) != fingerprint(str(tiny_sd_dir))
    (same / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 32}))
    assert fingerprint(str(same)) != fingerprint(str(tiny_sd_dir))


def test_a_lora_refuses_a_base_with_other_weights(tiny_sd_dir, tmp_path, trained_like_lora):
    other = perturbed_copy(tiny_sd_dir, tmp_path / "other")
    with pytest.raises(InputError) as err:
        load_pipeline(trained_like_lora[0], base_model=other)
    message = str(err.value)
    assert message.startswith(f"--base_model {other}: is not the model {trained_like_lora[0]} was trained on")
    assert fingerprint(str(other)) in message and fingerprint(str(tiny_sd_dir)) in message


def test_a_pipeline_folder_missing_a_component_says_which(tiny_sd_dir, tmp_path):
    broken = tmp_path / "no-unet"
    shutil.copytree(tiny_sd_dir, broken, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(InputError, match="model_index.json lists unet/ but the folder lacks it"):
        load_pipeline(broken)
    with pytest.raises(InputError, match="model_index.json lists unet/ but the folder lacks it"):
        load_training_parts(broken)


def test_a_missing_relative_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(InputError, match=r"outputs/lora: model directory not found \(relative paths start in"):
        resolve_model("outputs/lora")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="no hub model of that name is cached"):
        resolve_model("someone/sd-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("someone/sd-model") == "someone/sd-model"


def test_resolve_model_local_hub_and_missing(tiny_sd_dir, tmp_path):
    assert resolve_model(tiny_sd_dir) == str(tiny_sd_dir)
    with pytest.raises(InputError, match="model directory not found"):
        resolve_model(tmp_path / "nope" / "model")
    with pytest.raises(InputError, match="model directory not found"):
        resolve_model("./models/tiny")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        resolve_model(tmp_path / "f.txt")


def test_load_training_parts_rejects_non_pipeline_dirs(tmp_path, trained_like_lora):
    with pytest.raises(InputError, match="no model_index.json"):
        load_training_parts(tmp_path)
    with pytest.raises(InputError, match="LoRA folder"):
        load_training_parts(trained_like_lora[0])


def test_is_lora_dir(tiny_sd_dir, tmp_path, trained_like_lora):
    assert is_lora_dir(trained_like_lora[0])
    assert not is_lora_dir(tiny_sd_dir)
    assert not is_lora_dir(tmp_path)


def test_untrained_lora_is_a_no_op(tiny_sd_dir):
    unet = load_training_parts(tiny_sd_dir)["unet"]
    before = unet_output(unet)
    add_lora(unet, rank=4)
    assert torch.allclose(before, unet_output(unet))
    assert any("lora_A" in n for n, p in unet.named_parameters() if p.requires_grad)


def test_saved_lora_reloads_at_the_trained_scale_with_stock_loader(tiny_sd_dir, trained_like_lora):
    lora_dir, trained = trained_like_lora
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(lora_dir))
    reloaded = unet_output(pipe.unet)
    assert not torch.allclose(base, reloaded, atol=1e-4)
    assert torch.allclose(trained, reloaded, atol=1e-5)


def test_load_pipeline_detects_lora_and_full_dirs(tiny_sd_dir, trained_like_lora):
    lora_dir, trained = trained_like_lora
    full = load_pipeline(tiny_sd_dir, device="cpu")
    lora = load_pipeline(lora_dir, device="cpu")
    assert torch.allclose(unet_output(lora.unet), trained, atol=1e-5)

    def image(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("melanoma", num_inference_steps=2, generator=g, output_type="np").images[0]

    assert not np.allclose(image(full), image(lora))
    explicit = load_pipeline(lora_dir, base_model=tiny_sd_dir, device="cpu", dtype="float32")
    assert torch.allclose(unet_output(explicit.unet), trained, atol=1e-5)


def test_load_pipeline_errors(tmp_path, trained_like_lora):
    with pytest.raises(InputError, match="--model_path .*model directory not found"):
        load_pipeline(tmp_path / "missing")
    bare = tmp_path / "bare_lora"
    bare.mkdir()
    for f in trained_like_lora[0].glob("*.safetensors"):
        (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="does not record its base model"):
        load_pipeline(bare)
    with pytest.raises(InputError, match="--base_model"):
        load_pipeline(bare, base_model=tmp_path / "no_base")
    with pytest.raises(InputError, match="unknown dtype"):
        load_pipeline(trained_like_lora[0], dtype="int3")


@pytest.mark.parametrize("load", [load_pipeline, load_training_parts])
def test_a_gated_hub_model_says_how_to_log_in(monkeypatch, load):
    """SD 3.5 and FLUX.1-dev are gated: the hub answers 401/403 with GatedRepoError, which diffusers re-raises as
    a plain OSError; the user's line names the login, not a missing model."""
    import diffusers.configuration_utils
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    repo = "stabilityai/stable-diffusion-3.5-medium"

    def gated(*args, **kwargs):
        response = httpx2.Response(403, request=httpx2.Request("GET", f"https://huggingface.co/{repo}"))
        raise GatedRepoError(f"Access to model {repo} is restricted.", response=response)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(diffusers.configuration_utils, "hf_hub_download", gated)
    with pytest.raises(InputError) as err:
        load(repo)
    message = str(err.value)
    assert "\n" not in message
    assert f"{repo}: is a gated model on the Hugging Face Hub" in message
    assert "hf auth login" in message and "HF_TOKEN" in message
