"""The embedded model: SD's classes and shapes, saved like SD, loaded offline by from_pretrained, generating."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from lesiongen.diffusion.tiny import TinyConfig, build_components, main
from lesiongen.errors import InputError
from lesiongen.tokens import clip_tokenizer


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_configs_match_the_documented_architecture(tiny_sd_dir, tiny_pipe):
    unet = tiny_pipe.unet.config
    assert tuple(unet.block_out_channels) == (32, 64)
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 2
    assert unet.layers_per_block == 1 and unet.cross_attention_dim == 64 and unet.sample_size == 16
    assert 2 ** (len(tiny_pipe.vae.config.block_out_channels) - 1) == 4
    assert tiny_pipe.vae.config.latent_channels == 4
    text = tiny_pipe.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers, text.max_position_embeddings) == (64, 2, 77)
    assert text.vocab_size == 49408 and text.eos_token_id == 49407
    sched = json.loads((tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["clip_sample"] is False
    assert DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler").config.clip_sample is False
    n_params = sum(p.numel() for m in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder) for p in m.parameters())
    assert 3e6 < n_params < 8e6


def test_tokenizer_is_real_clip_bpe(tiny_pipe):
    prompt = "a dermoscopic image of melanoma with atypical pigment network and blue-whitish veil"
    ids = tiny_pipe.tokenizer(prompt).input_ids
    assert ids == clip_tokenizer()(prompt).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(set(ids)) > 10
    assert tiny_pipe.tokenizer.model_max_length == 77


def test_generates_64px_images_deterministically(tiny_pipe):
    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return np.asarray(tiny_pipe("melanoma", num_inference_steps=2, generator=g, output_type="np").images[0])

    a, b, c = sample(0), sample(0), sample(1)
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_seed_fixes_weights():
    a = build_components(seed=3)["unet"].state_dict()
    b = build_components(seed=3)["unet"].state_dict()
    c = build_components(seed=4)["unet"].state_dict()
    key = "conv_in.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_sample_size_follows_resolution_and_bad_resolution_is_rejected():
    assert build_components(resolution=32)["unet"].config.sample_size == 8
    with pytest.raises(InputError, match="--resolution"):
        TinyConfig(output_dir="x", resolution=70)


def test_attention_heads_set_the_unet_heads_and_a_non_divisor_is_rejected():
    unet = build_components(resolution=32, attention_heads=[2, 4])["unet"]
    heads = [block.attentions[0].transformer_blocks[0].attn1.heads for block in unet.down_blocks]
    assert heads == [2, 4]
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.inner_dim == 32
    assert build_components(resolution=32, attention_heads=[4])["unet"].config.attention_head_dim == (4, 4)
    with pytest.raises(InputError, match="--attention_heads 3"):
        TinyConfig(output_dir="x", attention_heads=[3])
    with pytest.raises(InputError, match="--attention_heads 2 4 8"):
        TinyConfig(output_dir="x", attention_heads=[2, 4, 8])


def test_cli_writes_a_loadable_pipeline(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "m"), "--resolution", "32", "--seed", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m", safety_checker=None)
    assert pipe.unet.config.sample_size == 8
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_the_cli_never_replaces_an_existing_file_or_folder(tmp_path, capsys):
    """Issue 15 probe: --output_dir naming a file or a trained model replaced it with random weights."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "model_index.json").write_text("{}")
    for target in (notes, trained):
        assert main(["--out", str(target), "--resolution", "32"]) == 2
        assert f"--output_dir {target}: already exists" in capsys.readouterr().err
    assert notes.read_text() == "mine" and [p.name for p in trained.iterdir()] == ["model_index.json"]
