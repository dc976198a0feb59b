"""VAE latents and text embeddings of a training set, computed once and kept on disk in shards.

With the cache a training step runs only the UNet. The VAE's latent *distribution* (mean and
log-variance) is cached rather than one sample, so a cached step samples exactly as an uncached one;
both flips of each image are cached so random flip survives caching, with each frame's file size and crop
corner (SDXL's size conditioning). Text embeddings (every one the
family's denoiser takes: ``prompt_embeds``, and ``pooled_prompt_embeds`` for SDXL) are cached only while
the text encoders are frozen, in the dtype the frozen encoders run in (the training dtype).

The cache is a folder of ``shard-<i>-of-<n>.safetensors`` files of ``shard_size`` images each, so it
scales with the disk, not with RAM: each process of an accelerate launch encodes its own shards (i, i +
world, ...), each shard is written under a temporary name and renamed when complete (a killed build
resumes at the first missing shard), and training reads single items through memory-mapped
``safe_open`` handles, never the whole cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..files import atomic_path
from .dataset import Example, ImageCaptionDataset, image_identity, item_caption
from .families import prompt_encoder, tokenize
from .fingerprint import fingerprint

SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.safetensors$")
# Open shard handles kept per process (least recently used dropped): a kept handle reads an item 2.5x faster
# (measured 69 vs 171 us), but each maps its file, and a large cache has
# thousands of shards: more than a default limit of 1024 open files, and mapped pages count as RSS.
OPEN_SHARDS = 8
# Part of the cache key: caches of another layout are rebuilt, never misread (2: file sizes and crop corners).
CACHE_FORMAT = 2


def cache_key(
    examples: list[Example],
    model: str,
    resolution: int,
    center_crop: bool,
    dtype: torch.dtype,
    with_text: bool,
    family: str = "sd1",
) -> str:
    """Changes whenever anything the cached tensors depend on changes, so a stale cache is never reused.

    ``model`` is the fingerprint of the model parts that encode (``encoder_fingerprint``), not its path: a
    base rebuilt or retrained at the same path must not reuse latents its old VAE made."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, str(model), resolution, center_crop, str(dtype), with_text, family]).encode())
    for ex in examples:
        h.update(f"{image_identity(ex.image)}|{ex.text}\n".encode())
    return h.hexdigest()


def encoder_fingerprint(source: str, family, with_text: bool) -> str:
    """The fingerprint of what the cached tensors come from: the VAE, and the text encoders and tokenizers when
    their embeddings are cached (the path, for a hub model not downloaded, which loading has ruled out)."""
    parts = ("vae", *family.text_encoders, *family.tokenizers) if with_text else ("vae",)
    return fingerprint(source, parts) or source


@dataclass(frozen=True)
class CacheLayout:
    """Where each image's tensors live: image i is row i % shard_size of shard i // shard_size."""

    folder: Path
    key: str
    n_items: int
    shard_size: int
    with_text: bool
    model: str = ""  # encoder_fingerprint, recorded in each shard so a rebuild can say why

    @property
    def n_shards(self) -> int:
        return -(-self.n_items // self.shard_size)

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}-of-{self.n_shards:05d}.safetensors"

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.n_items))

    def is_complete(self, shard: int) -> bool:
        """True when the shard's file exists and was written for this key (only complete files get a final name)."""
        path = self.path(shard)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("key") == self.key
        except (SafetensorError, OSError):
            return False

    def missing(self) -> list[int]:
        return [s for s in range(self.n_shards) if not self.is_complete(s)]


def stale_reason(layout: CacheLayout, model: str) -> str | None:
    """Why the shards already in the folder will be rebuilt (None when there are none, or they are this key's)."""
    if not layout.folder.is_dir():
        return None
    for path in sorted(p for p in layout.folder.iterdir() if SHARD_RE.match(p.name)):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError):
            continue
        if meta.get("key") == layout.key:
            return None
        if meta.get("model") != model:
            return f"its VAE or text encoders changed (fingerprint {meta.get('model', 'not recorded')} -> {model})"
        return "its images, captions or settings changed"
    return None


def remove_stale(layout: CacheLayout) -> None:
    """Drop shards of another layout and temporaries left by a killed build (main process, before building)."""
    if not layout.folder.is_dir():
        return
    wanted = {layout.path(s).name for s in range(layout.n_shards)}
    for p in layout.folder.iterdir():
        stale_shard = SHARD_RE.match(p.name) and p.name not in wanted
        killed_write = p.name.startswith(".shard-") and p.name.endswith(".tmp")
        if stale_shard or killed_write or p.name == "latents.safetensors":  # the unsharded cache of earlier versions
            p.unlink()


class _BothFlips(Dataset):
    """Decoded pixels of both flips of an image with its framing, so DataLoader workers can decode while the VAE
    encodes."""

    def __init__(self, images: ImageCaptionDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        x, original_size, corners = self.images.framed(index)
        return {
            "pixels": torch.stack([x, torch.flip(x, dims=[-1])]),
            "original_size": original_size,
            "corners": corners,
        }


@torch.no_grad()
def encode_batch(images: ImageCaptionDataset, rows: list[int], framed: dict, vae, encode_text, embed_dtype):
    """Latent distributions of both flips of ``rows`` with their framing (and their caption embeddings when
    ``encode_text`` is given)."""
    p = vae.encode(framed["pixels"].flatten(0, 1).to(vae.device, vae.dtype)).latent_dist.parameters
    out = {
        "latent_params": p.reshape(len(rows), 2, *p.shape[1:]).cpu(),
        "original_size": framed["original_size"],
        "crop_top_left": framed["corners"],
    }
    if encode_text is not None:
        embeds = encode_text([images.examples[i].text for i in rows])
        out.update({k: v.to(embed_dtype).cpu() for k, v in embeds.items()})
    return out


def build_shards(
    layout: CacheLayout,
    images: ImageCaptionDataset,
    vae,
    encode_text,
    embed_dtype: torch.dtype,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 16,
    num_workers: int = 0,
    show_progress: bool = True,
) -> int:
    """Encode this process's missing shards (rank, rank + world, ...); returns how many it wrote.

    ``encode_text`` (``families.prompt_encoder``) maps captions to named embeddings, or is None when the
    text encoder trains. Each shard is complete on disk before its final name appears, so a rerun after
    a kill starts at the first missing shard and never reads a half-written one. One loader serves all
    of them, so decoding workers start once, not once per shard.
    """
    todo = [s for s in range(rank, layout.n_shards, world) if not layout.is_complete(s)]
    plan = [
        (s, list(layout.rows(s)[i : i + batch_size])) for s in todo for i in range(0, layout.shard_size, batch_size)
    ]
    plan = [(s, rows) for s, rows in plan if rows]
    if not plan:
        return 0
    empty = {}
    if encode_text is not None:
        with torch.no_grad():
            empty = {f"empty_{k}": v[0].to(embed_dtype).cpu() for k, v in encode_text([""]).items()}
    loader = DataLoader(_BothFlips(images), batch_sampler=[rows for _, rows in plan], num_workers=num_workers)
    bar = tqdm(total=len(todo), desc="caching latents", unit="shard", disable=not show_progress)
    parts: list[dict] = []
    for (shard, rows), framed in zip(plan, loader, strict=True):
        parts.append(encode_batch(images, rows, framed, vae, encode_text, embed_dtype))
        if rows[-1] != layout.rows(shard)[-1]:
            continue
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} | empty
        with atomic_path(layout.path(shard)) as tmp:
            meta = {"key": layout.key, "model": layout.model, "first_row": str(layout.rows(shard).start)}
            save_file(tensors, str(tmp), metadata=meta)
        parts = []
        bar.update(1)
    bar.close()
    return len(todo)


class CachedLatentDataset(Dataset):
    """Items read from the shards through memory-mapped handles; the planned flip selects one cached latent.

    The embedding names are read from the shards, so one reader serves every family."""

    def __init__(
        self, layout: CacheLayout, examples: list[Example], tokenizers: list, tag_dropout: float = 0.0, seed: int = 0
    ):
        missing = layout.missing()
        if missing:
            raise RuntimeError(f"latent cache {layout.folder} is missing shards {missing[:5]}; build it first")
        self.layout, self.examples, self.tokenizers = layout, examples, tokenizers
        self.tag_dropout, self.seed = tag_dropout, seed  # for captions tokenized per step (text encoders train)
        self._handles: OrderedDict[int, object] = OrderedDict()
        self.shards_written = 0  # by this process when it built the cache (reports)
        first = self._open(0)
        self.empty = {k[len("empty_") :]: first.get_tensor(k) for k in first.keys() if k.startswith("empty_")}

    def __len__(self) -> int:
        return len(self.examples)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": OrderedDict()}  # DataLoader workers open their own handles

    def _open(self, shard: int):
        handle = self._handles.pop(shard, None) or safe_open(str(self.layout.path(shard)), framework="pt")
        self._handles[shard] = handle
        if len(self._handles) > OPEN_SHARDS:
            self._handles.popitem(last=False)
        return handle

    def item_tensors(self, index: int, flip: bool) -> tuple[dict, dict]:
        """({latent distribution [2C, h, w], file size, crop corner}, named caption embeddings, empty when text
        is not cached) of one image."""
        shard, row = divmod(index, self.layout.shard_size)
        f = self._open(shard)
        frame = {
            "latent_params": f.get_slice("latent_params")[row, int(flip)],
            "original_size": f.get_slice("original_size")[row],
            "crop_top_left": f.get_slice("crop_top_left")[row, int(flip)],
        }
        return frame, {k: f.get_slice(k)[row] for k in self.empty}

    def __getitem__(self, key: tuple[int, bool, bool, int]) -> dict:
        index, flip, drop, item = key
        frame, embeds = self.item_tensors(index, flip)
        out = {**frame, "item": torch.tensor(item)}
        if embeds:
            out.update(self.empty if drop else embeds)
        else:
            text = item_caption(self.examples[index].text, key, self.seed, self.tag_dropout)
            out.update({k: v[0] for k, v in tokenize(self.tokenizers, [text]).items()})
        return out


def open_cache(cfg, examples: list[Example], parts: dict, accelerator, with_text: bool, embed_dtype: torch.dtype):
    """Build what is missing of ``cfg``'s cache (every process its share of shards), then open it memory-mapped.

    ``cfg`` is a ``TrainConfig``; ``parts`` the loaded model parts with the VAE (and the frozen text
    encoders) already on the device in the training dtype.
    """
    family = parts["family"]
    tokenizers = [parts[n] for n in family.tokenizers]
    images = ImageCaptionDataset(examples, tokenizers, cfg.resolution, cfg.center_crop)
    model = encoder_fingerprint(cfg.pretrained_model_name_or_path, family, with_text)
    key = cache_key(examples, model, cfg.resolution, cfg.center_crop, parts["vae"].dtype, with_text, family.name)
    folder = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "latent_cache"
    layout = CacheLayout(folder, key, len(examples), cfg.cache_shard_size, with_text, model)
    if accelerator.is_main_process:
        if (why := stale_reason(layout, model)) is not None:
            print(f"latent cache {folder}: rebuilding it, {why}")
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale(layout)
    accelerator.wait_for_everyone()
    written = build_shards(
        layout,
        images,
        parts["vae"],
        prompt_encoder(parts) if with_text else None,
        embed_dtype,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        num_workers=cfg.dataloader_num_workers,
        show_progress=accelerator.is_main_process,
    )
    accelerator.wait_for_everyone()
    dataset = CachedLatentDataset(layout, examples, tokenizers, cfg.tag_dropout, cfg.seed)
    dataset.shards_written = written
    return dataset
