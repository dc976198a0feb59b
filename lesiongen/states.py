"""Training state without pickle: nested dicts and lists of tensors and numbers in one safetensors file.

``torch.save`` pickles, and unpickling a file runs whatever code it names, so a checkpoint a user is
handed could run code the moment it is loaded. Here tensors go into a safetensors file (raw bytes and
a JSON header) and everything else (config, epoch, metrics, optimiser hyperparameters) into JSON in
that header: reading one back decodes data and nothing else. One file, written atomically, so the
weights and their description can never disagree after a kill.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import atomic_path

STATE_KEY = "lesiongen_state"  # the header entry holding the JSON part
TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"  # markers for what JSON cannot spell


def _encode(obj: Any, name: str, tensors: dict) -> Any:
    """JSON for ``obj``, moving each tensor into ``tensors`` under its path in the structure."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous()
        return {TENSOR: name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in obj.items()}
        # an optimiser's state is keyed by parameter number; JSON would turn 0 into "0"
        return {ITEMS: [[k, _encode(v, f"{name}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {TUPLE: [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{name}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if TENSOR in obj:
            return tensors[obj[TENSOR]]
        if TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[TUPLE])
        if ITEMS in obj:
            return {k: _decode(v, tensors) for k, v in obj[ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def write_state(path: str | Path, state: dict) -> None:
    """Save ``state`` (dicts, lists, tuples, tensors, numbers, strings) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors: dict = {}
    header = json.dumps(_encode(state, "", tensors))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={STATE_KEY: header})


def read_state(path: str | Path, fix: str) -> dict:
    """The state ``write_state`` saved, or an InputError (with ``fix``) for any other file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(STATE_KEY)
        if header is None:
            raise InputError(path, "is a safetensors file without LesionGen state", fix)
        return _decode(json.loads(header), load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(path, f"is not a readable checkpoint file ({type(e).__name__})", fix) from None
