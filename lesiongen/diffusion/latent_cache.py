"""VAE latents and text embeddings of a training set, computed once and kept on disk.

With the cache a training step runs only the UNet. The VAE's latent *distribution* (mean and
log-variance) is cached rather than one sample, so a cached step samples exactly as an uncached one;
both flips of each image are cached so random flip survives caching. Text embeddings are cached only
while the text encoder is frozen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from ..files import atomic_path
from .dataset import Example, ImageCaptionDataset, tokenize

CACHE_FILE = "latents.safetensors"


@dataclass
class LatentCache:
    latent_params: torch.Tensor  # [N, 2 (no flip, flip), 2 * latent channels, h, w]
    prompt_embeds: torch.Tensor | None  # [N, 77, D], or None when the text encoder trains
    empty_embed: torch.Tensor | None  # [77, D]: the "" caption used for caption dropout


def cache_key(
    examples: list[Example], model: str, resolution: int, center_crop: bool, dtype: torch.dtype, with_text: bool
) -> str:
    """Changes whenever anything the cached tensors depend on changes, so a stale cache is never reused."""
    h = hashlib.sha256()
    h.update(json.dumps([str(model), resolution, center_crop, str(dtype), with_text]).encode())
    for ex in examples:
        st = ex.path.stat()
        h.update(f"{ex.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{ex.text}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def encode_dataset(
    dataset: ImageCaptionDataset, vae, text_encoder, batch_size: int = 16, show_progress: bool = True
) -> LatentCache:
    """Encode every image (and its mirror image) with the VAE, and every caption if a text encoder is given."""
    device, dtype = vae.device, vae.dtype
    params, embeds = [], []
    n = len(dataset)
    for start in tqdm(range(0, n, batch_size), desc="caching latents", unit="batch", disable=not show_progress):
        idx = range(start, min(start + batch_size, n))
        pixels = torch.stack([dataset.pixels(i, flip) for i in idx for flip in (False, True)])
        p = vae.encode(pixels.to(device, dtype)).latent_dist.parameters
        params.append(p.reshape(len(idx), 2, *p.shape[1:]).cpu())
        if text_encoder is not None:
            ids = tokenize(dataset.tokenizer, [dataset.examples[i].text for i in idx])
            embeds.append(text_encoder(ids.to(device))[0].cpu())
    empty = None
    if text_encoder is not None:
        empty = text_encoder(tokenize(dataset.tokenizer, [""]).to(device))[0][0].cpu()
    return LatentCache(torch.cat(params), torch.cat(embeds) if embeds else None, empty)


def load_or_build(cache_dir: str | Path, key: str, build) -> LatentCache:
    """Reuse ``cache_dir`` when its key matches, else call ``build()`` and save the result atomically."""
    path = Path(cache_dir) / CACHE_FILE
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stored_key = (f.metadata() or {}).get("key")
        if stored_key == key:
            t = load_file(str(path))
            return LatentCache(t["latent_params"], t.get("prompt_embeds"), t.get("empty_embed"))
    cache = build()
    tensors = {"latent_params": cache.latent_params.contiguous()}
    if cache.prompt_embeds is not None:
        tensors["prompt_embeds"] = cache.prompt_embeds.contiguous()
        tensors["empty_embed"] = cache.empty_embed.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": key})
    return cache


class CachedLatentDataset(Dataset):
    """Items from the cache: the planned flip selects one of the two cached latents."""

    def __init__(self, cache: LatentCache, examples: list[Example], tokenizer):
        self.cache, self.examples, self.tokenizer = cache, examples, tokenizer

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, bool, bool]) -> dict:
        index, flip, drop = key
        item = {"latent_params": self.cache.latent_params[index, int(flip)]}
        if self.cache.prompt_embeds is not None:
            item["prompt_embeds"] = self.cache.empty_embed if drop else self.cache.prompt_embeds[index]
        else:
            item["input_ids"] = tokenize(self.tokenizer, ["" if drop else self.examples[index].text])[0]
        return item
