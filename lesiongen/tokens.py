"""The real CLIP BPE tokenizer built offline, and token counts against CLIP's 77-token window.

open-clip-torch ships CLIP's BPE merges (``open_clip/bpe_simple_vocab_16e6.txt.gz``); CLIP's
``vocab.json`` is the 256 byte symbols, the same with ``</w>``, one token per merge, then the two
special tokens, so Stable Diffusion 1.x token counts can be measured without a model download.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import InputError
from .files import write_text

CLIP_MAX_TOKENS = 77
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49408 = 256 + 256 + merges + 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=False))


def bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("open_clip", "open-clip-torch is not installed", "pip install -r requirements.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) that ``from_pretrained`` loads."""
    folder = Path(folder)
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_symbols = list(_bytes_to_unicode().values())
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    write_text(folder / "vocab.json", json.dumps(vocab))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_TOKENS,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    write_text(
        folder / "special_tokens_map.json",
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}),
    )
    return folder


@lru_cache(maxsize=1)
def clip_tokenizer():
    """A CLIPTokenizer identical to SD 1.x's, built once per process in a temporary folder."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="lesiongen-clip-") as tmp:
        write_tokenizer_files(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_MAX_TOKENS)
    return tok


def count_tokens(text: str) -> int:
    """Tokens the CLIP text encoder sees for ``text``, start and end tokens included, untruncated."""
    return len(clip_tokenizer()(text, truncation=False, verbose=False)["input_ids"])


def fits_clip(text: str, limit: int = CLIP_MAX_TOKENS) -> bool:
    return count_tokens(text) <= limit
