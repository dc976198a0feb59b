"""Convert a pickled classifier checkpoint from an earlier version (``best.pt``, ``last.pt``) to safetensors.

    python -m lesiongen.classify.convert_checkpoint --checkpoint weights/best.pt  # writes weights/best.safetensors

Unpickling runs any code a file names, so the file is first read with ``torch.load(weights_only=True)``,
PyTorch's loader that accepts only tensors and plain values (every checkpoint earlier versions wrote
loads this way). A file that needs more is refused unless ``--trust`` says it comes from a trusted source.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cli import option, parse_config, run
from ..errors import InputError
from ..states import write_state
from .models import FORMAT, check_checkpoint


@dataclass
class ConvertConfig:
    """Convert a pickled classifier checkpoint (.pt) to the safetensors format this version reads."""

    checkpoint: str = option(help="the old best.pt or last.pt")
    output: str | None = option(None, help="where the converted checkpoint goes (default: beside it, .safetensors)")
    trust: bool = option(
        False, help="allow full unpickling, which runs any code in the file: only for a file from a source you trust"
    )


def convert(cfg: ConvertConfig) -> Path:
    import torch

    src = Path(cfg.checkpoint)
    out = Path(cfg.output) if cfg.output else src.with_suffix(".safetensors")
    if not src.is_file():
        raise InputError(src, "checkpoint not found", "pass the best.pt or last.pt an earlier classifier.py wrote")
    if out.exists():
        raise InputError(out, "already exists and is not overwritten", "pass --output with a new path")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=not cfg.trust)
    except pickle.UnpicklingError as e:
        raise InputError(
            src,
            f"holds more than tensors and plain values ({str(e).splitlines()[0][:120]})",
            "only if you made this file or trust its source, rerun with --trust",
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise InputError(src, f"is not a readable PyTorch checkpoint ({type(e).__name__})", "check the path") from None
    if not isinstance(ckpt, dict):
        raise InputError(src, "is not a LesionGen classifier checkpoint", "pass a best.pt or last.pt")
    state = check_checkpoint(src, {**ckpt, "format": FORMAT})
    write_state(out, state)
    print(f"wrote {out}; it loads like any checkpoint this version writes (eval.py --checkpoint {out})")
    return out


def main(argv: list[str] | None = None) -> int:
    return run(
        lambda: convert(parse_config(ConvertConfig, argv, prog="python -m lesiongen.classify.convert_checkpoint"))
    )


if __name__ == "__main__":
    sys.exit(main())
