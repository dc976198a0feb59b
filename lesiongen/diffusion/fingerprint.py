"""A cheap content fingerprint of a diffusers model, so a LoRA never silently runs on another base.

A path says where a model was, not what it is: a relative path resolves against whatever folder a
command runs from, and a folder can be overwritten. Hashing every byte identifies a model for sure but
reads 2-4 GB for Stable Diffusion (seconds to minutes per load), so the fingerprint hashes, for each
component that has weights (UNet, VAE, text encoder) and the tokenizer:

- its configs, without bookkeeping keys (``_diffusers_version``, ``_name_or_path``, ...), so re-saving
  the same weights with another library version keeps the fingerprint;
- each default weight file's size and, for safetensors, its header (every tensor's name, dtype, shape
  and offset) plus the first ``SAMPLE_BYTES`` of every tensor. Fine-tunes of one base share every
  header; a full fine-tune, or a LoRA merged into the weights, changes the leading values of every
  tensor it touches. Reading ~1,100 small slices of SD 1.5 takes milliseconds;
- for a pickled ``.bin`` weight file, its size and ``SAMPLE_BYTES`` at 16 evenly spaced offsets.

Variant files (``*.fp16.safetensors``) are left out: a hub cache holds whichever ones were downloaded,
and they must not change what the model is.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Collection
from pathlib import Path

SAMPLE_BYTES = 64
MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size
SKIPPED_COMPONENTS = {"scheduler", "safety_checker", "feature_extractor"}  # no weights the LoRA depends on
WEIGHT_RE = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
CONFIG_SUFFIXES = (".json", ".txt")  # component configs and tokenizer vocabularies
BOOKKEEPING_KEYS = ("transformers_version",)  # plus every key starting with "_"


def model_folder(source: str) -> Path | None:
    """The folder holding a model: a local directory, or a hub id's snapshot in the Hugging Face cache
    (None while it has not been downloaded)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "model_index.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _config_digest(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".json":
        return hashlib.sha256(data).digest()
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return hashlib.sha256(data).digest()
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in BOOKKEEPING_KEYS}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).digest()


def _weights_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        parsed = _safetensors_tensors(f) if path.suffix == ".safetensors" else None
        if parsed is None:  # pickled weights, or a safetensors file too damaged to parse
            offsets = [i * max(size - SAMPLE_BYTES, 0) // 15 for i in range(16)]
        else:
            start, tensors = parsed
            h.update(json.dumps(tensors, sort_keys=True).encode())
            offsets = [start + int(info["data_offsets"][0]) for _, info in sorted(tensors.items())]
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return h.digest()


def _safetensors_tensors(f) -> tuple[int, dict] | None:
    """(where the data starts, tensor name -> dtype, shape, data_offsets) of a safetensors file, or None."""
    try:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(length, MAX_HEADER)))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        for info in tensors.values():
            int(info["data_offsets"][0])
    except (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return 8 + length, tensors


def fingerprint(source: str, components: Collection[str] | None = None) -> str | None:
    """16 hex digits identifying a model's weights and configs (see the module docstring), or None when the
    model is a hub id not downloaded yet. ``components`` limits it to those component folders (the latent
    cache depends on the VAE and the text encoders, not on the UNet that trains)."""
    folder = model_folder(source)
    if folder is None:
        return None
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if len(rel.parts) != 2 or rel.parts[0] in SKIPPED_COMPONENTS or not path.is_file():
            continue
        if components is not None and rel.parts[0] not in components:
            continue
        if WEIGHT_RE.match(path.name):
            h.update(rel.as_posix().encode() + _weights_digest(path))
        elif path.suffix in CONFIG_SUFFIXES:
            h.update(rel.as_posix().encode() + _config_digest(path))
    return h.hexdigest()[:16]
