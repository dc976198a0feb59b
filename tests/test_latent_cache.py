"""The sharded latent cache: a kill -9 mid-build resumes to the same tensors, items read memory-mapped are the
encoded ones whatever the number of open shards, and stale files of other layouts or killed writes are cleared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lesiongen.diffusion.latent_cache as latent_cache
from lesiongen.diffusion.cache_latents import build_cache
from lesiongen.diffusion.dataset import ImageCaptionDataset, collate, make_loader, read_examples
from lesiongen.diffusion.families import prompt_encoder
from lesiongen.diffusion.latent_cache import CachedLatentDataset, CacheLayout, build_shards, remove_stale
from lesiongen.diffusion.pipeline import load_training_parts
from lesiongen.diffusion.train import TrainConfig
from lesiongen.tokens import clip_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Runs the cache command in a child that writes two shards, then on the third writes half a file under
# the temporary name and SIGKILLs itself: the worst moment a real kill could land.
KILLED_BUILD = """
import os, signal, sys
import lesiongen.diffusion.latent_cache as latent_cache
real_save, saves = latent_cache.save_file, []
def save_then_die(tensors, path, metadata=None):
    saves.append(path)
    real_save(tensors, path, metadata=metadata)
    if len(saves) == 3:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
latent_cache.save_file = save_then_die
from lesiongen.diffusion.cache_latents import main
sys.exit(main(sys.argv[1:]))
"""


def cache_config(tiny_sd_dir, data, out: Path) -> TrainConfig:
    return TrainConfig(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        train_data_dir=str(data),
        output_dir=str(out),
        resolution=64,
        rank=4,
        cache_shard_size=2,
        mixed_precision="no",
        report_to="none",
    )


def argv(cfg: TrainConfig) -> list[str]:
    return [f"--{k}={v}" for k, v in vars(cfg).items() if v is not None]


def test_sigkill_mid_build_then_resume_gives_the_uninterrupted_tensors(tiny_sd_dir, d7p_small_train, tmp_path):
    killed = cache_config(tiny_sd_dir, d7p_small_train, tmp_path / "killed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, *argv(killed)], env=env, cwd=REPO, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    n_images = len((d7p_small_train / "metadata.jsonl").read_text().splitlines())
    n = -(-n_images // 2)
    assert n >= 4
    shard_names = [f"shard-{i:05d}-of-{n:05d}.safetensors" for i in range(n)]
    folder = tmp_path / "killed" / "latent_cache"
    assert sorted(p.name for p in folder.glob("shard-*")) == shard_names[:2]
    torn = [p.name for p in folder.glob(".shard-*")]
    assert len(torn) == 1 and torn[0].startswith(f".{shard_names[2]}.") and torn[0].endswith(".tmp")
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}

    resumed = build_cache(killed)
    assert resumed.shards_written == n - 2 and resumed.images == n_images
    assert sorted(p.name for p in folder.iterdir()) == shard_names
    assert all(folder.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items()), "complete shards were rewritten"

    whole = build_cache(replace(killed, output_dir=str(tmp_path / "whole")))
    assert whole.shards_written == n
    for name in shard_names:
        a = load_file(folder / name)
        b = load_file(tmp_path / "whole" / "latent_cache" / name)
        assert (
            a.keys()
            == b.keys()
            == {
                "latent_params",
                "original_size",
                "crop_top_left",
                "prompt_embeds",
                "empty_prompt_embeds",
            }
        )
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert build_cache(killed).shards_written == 0  # complete: a rerun encodes nothing


@pytest.fixture(scope="module")
def small_cache(tiny_sd_dir, d7p_small_train, tmp_path_factory):
    """Seven images in shards of three (the last one short), text embeddings stored in bfloat16."""
    parts = load_training_parts(tiny_sd_dir)
    examples = read_examples(d7p_small_train, [parts["tokenizer"]])[:7]
    images = ImageCaptionDataset(examples, [parts["tokenizer"]], 64, center_crop=True)
    layout = CacheLayout(tmp_path_factory.mktemp("cache"), "key", len(examples), shard_size=3, with_text=True)
    assert build_shards(layout, images, parts["vae"], prompt_encoder(parts), torch.bfloat16, batch_size=2) == 3
    return layout, examples, parts


def test_items_read_memory_mapped_equal_the_encoded_tensors_with_few_open_shards(small_cache, monkeypatch):
    layout, examples, parts = small_cache
    monkeypatch.setattr(latent_cache, "OPEN_SHARDS", 2)
    dataset = CachedLatentDataset(layout, examples, [parts["tokenizer"]])
    shards = [load_file(layout.path(s)) for s in range(layout.n_shards)]
    assert [len(s["latent_params"]) for s in shards] == [3, 3, 1]
    assert shards[0]["prompt_embeds"].dtype == torch.bfloat16 and shards[0]["latent_params"].dtype == torch.float32
    for index in [6, 0, 3, 1, 6, 4, 2, 5]:  # jumps between shards, so handles are dropped and reopened
        for flip in (False, True):
            item = dataset[(index, flip, False, 99)]
            shard = shards[index // 3]
            assert torch.equal(item["latent_params"], shard["latent_params"][index % 3, int(flip)])
            assert torch.equal(item["prompt_embeds"], shard["prompt_embeds"][index % 3])
            assert item["item"].item() == 99
        assert len(dataset._handles) <= 2
    assert torch.equal(dataset[(2, False, True, 0)]["prompt_embeds"], shards[2]["empty_prompt_embeds"])


def test_cached_items_carry_the_framing_of_decoded_ones(small_cache):
    """SDXL's size conditioning reads each frame's file size and crop corner; cached training must see the
    values the uncached path computes, flip by flip (Derm7pt's 768x512 files are cropped at the side)."""
    layout, examples, parts = small_cache
    cached = CachedLatentDataset(layout, examples, [parts["tokenizer"]])
    decoded = ImageCaptionDataset(examples, [parts["tokenizer"]], 64, center_crop=True)
    for index in range(len(examples)):
        for flip in (False, True):
            a, b = cached[(index, flip, False, 0)], decoded[(index, flip, False, 0)]
            assert torch.equal(a["original_size"], b["original_size"])
            assert torch.equal(a["crop_top_left"], b["crop_top_left"])
    with Image.open(examples[0].image) as im:
        assert decoded[(0, False, False, 0)]["original_size"].tolist() == [im.height, im.width]


@pytest.mark.parametrize("center_crop", [True, False])
def test_the_crop_corner_is_where_the_frame_was_cut_in_both_flips(tmp_path, center_crop):
    """An odd width makes the two flips' corners differ by one: each reported corner cuts exactly the pixels
    the item holds from the (mirrored) resized image."""
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 255, (64, 99, 3), dtype=np.uint8)).save(path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "wide.png", "text": "a lesion"}\n')
    tokenizer = clip_tokenizer()
    dataset = ImageCaptionDataset(read_examples(tmp_path, [tokenizer]), [tokenizer], 32, center_crop)
    resized = F.resize(Image.open(path).convert("RGB"), 32, interpolation=F.InterpolationMode.BILINEAR)
    assert resized.size == (49, 32)
    torch.manual_seed(3)
    for flip, source in ((False, resized), (True, F.hflip(resized))):
        item = dataset[(0, flip, False, 0)]
        assert item["original_size"].tolist() == [64, 99]
        top, left = item["crop_top_left"].tolist()
        expected = F.normalize(F.to_tensor(F.crop(source, top, left, 32, 32)), [0.5], [0.5])
        assert torch.allclose(item["pixel_values"], expected, atol=1e-6), (flip, top, left)
    if center_crop:  # (49 - 32) / 2 = 8.5 rounds to 8 from the left, so the mirror's corner is at 9
        assert [dataset[(0, f, False, 0)]["crop_top_left"].tolist() for f in (False, True)] == [[0, 8], [0, 9]]


def test_dataloader_workers_read_the_same_items(small_cache):
    layout, examples, parts = small_cache
    dataset = CachedLatentDataset(layout, examples, [parts["tokenizer"]])
    keys = [[(i, i % 2 == 0, False, i) for i in range(j, j + 2)] for j in range(0, 6, 2)]
    direct = [collate([dataset[k] for k in batch]) for batch in keys]
    loaded = list(make_loader(dataset, keys, num_workers=2))
    for a, b in zip(direct, loaded, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stale_layouts_and_killed_writes_are_removed_and_a_new_key_rebuilds(small_cache, tmp_path):
    layout, examples, parts = small_cache
    folder = tmp_path / "c"
    folder.mkdir()
    for name in ("shard-00000-of-00009.safetensors", ".shard-00001-of-00003.safetensors.x.tmp", "latents.safetensors"):
        (folder / name).write_bytes(b"old")
    (folder / "notes.txt").write_text("kept")
    fresh = replace(layout, folder=folder, key="new")
    (folder / fresh.path(0).name).write_bytes(b"torn")  # not a readable safetensors file: not complete
    remove_stale(fresh)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", fresh.path(0).name]
    assert fresh.missing() == [0, 1, 2]
    for s in range(3):
        (folder / layout.path(s).name).write_bytes(layout.path(s).read_bytes())
    assert fresh.missing() == [0, 1, 2]  # complete files of another key are not reused
    assert replace(fresh, key=layout.key).missing() == []
    with pytest.raises(RuntimeError, match="missing shards"):
        CachedLatentDataset(fresh, examples, [parts["tokenizer"]])


def test_a_model_rebuilt_at_the_same_path_rebuilds_the_cache_saying_why(tiny_sd_dir, d7p_small_train, tmp_path, capsys):
    """Issue 32: the cache key held the model's path, so a VAE retrained or rebuilt in place trained the UNet on
    latents of the old VAE. The key holds the fingerprint of the encoding parts: another VAE at the same path
    rebuilds every shard, saying why; another UNet (which the cache does not depend on) reuses them."""
    import shutil

    from builders import perturb

    base = shutil.copytree(tiny_sd_dir, tmp_path / "base")
    cfg = replace(cache_config(base, d7p_small_train, tmp_path / "out"), cache_shard_size=4)
    first = build_cache(cfg)
    folder = tmp_path / "out" / "latent_cache"
    before = load_file(sorted(folder.glob("shard-*"))[0])["latent_params"]
    assert first.shards_written >= 2
    capsys.readouterr()

    perturb(base, "unet", "conv_in.weight")
    assert build_cache(cfg).shards_written == 0
    assert "rebuilding" not in capsys.readouterr().out

    perturb(base, "vae", "encoder.conv_in.weight")
    rebuilt = build_cache(cfg)
    assert rebuilt.shards_written == first.shards_written
    out = capsys.readouterr().out
    assert f"latent cache {folder}: rebuilding it, its VAE or text encoders changed (fingerprint " in out
    after = load_file(sorted(folder.glob("shard-*"))[0])["latent_params"]
    assert not torch.equal(before, after)
