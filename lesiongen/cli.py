"""Dataclass configs become argparse parsers, and every ``main`` exits with one line on bad input.

A flag is declared once, as a dataclass field: its name is the flag, ``metadata["help"]`` the help
text, ``metadata["choices"]`` the valid values and ``metadata["aliases"]`` extra spellings.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import shutil
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError
from .files import check_output_apart, output_lock

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with CLI metadata (help, choices, aliases)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if isinstance(default, (list, dict, set)):
        kwargs["default_factory"] = lambda d=default: type(d)(d)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _base_type(tp: Any) -> tuple[Any, bool, bool]:
    """Return (scalar type, optional?, list?) for a resolved annotation."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return typing.get_args(tp)[0], optional, True
    return tp, optional, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


def _finite(flag: str, optional: bool) -> Callable[[str], float | None]:
    """A float parser for ``flag`` that refuses nan and +-inf: Python's float() takes them, and a nan guidance
    or LoRA scale samples black images, an infinite learning rate trains to nan, with exit code 0."""

    def parse(text: str) -> float | None:
        if optional and text.lower() in ("none", "null", ""):
            return None
        value = float(text)  # a ValueError is argparse's own "invalid float value"
        if not math.isfinite(value):
            raise InputError(f"{flag} {text}", "is not a finite number", f"pass a number, e.g. {flag} 1.0")
        return value

    return parse


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional, is_list = _base_type(hints[f.name])
        meta = f.metadata
        names = [f"--{f.name}"]
        kebab = f"--{f.name.replace('_', '-')}"
        if kebab != names[0]:
            names.append(kebab)
        names += list(meta.get("aliases", ()))
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
            kw["help"] += f" (default: {f.default})"
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            kw["default"] = f.default_factory()  # type: ignore[misc]
            kw["help"] += f" (default: {kw['default']})"
        else:
            kw["required"] = True
        if tp is bool and not is_list:
            kw["type"] = _parse_bool
            kw["nargs"] = "?"
            kw["const"] = True
            kw["metavar"] = "BOOL"
        else:
            kw["type"] = tp if tp in (int, str) else str
            if optional and tp is int:
                kw["type"] = lambda text: None if text.lower() in ("none", "null", "") else int(text)
            if tp is float:
                kw["type"] = _finite(names[0], optional)
            if is_list:
                kw["nargs"] = "+"
        if "choices" in meta:
            kw["choices"] = list(meta["choices"])
        if "bare" in meta:  # the value a flag given without one means (``--torch_compile`` alone: true)
            kw["nargs"], kw["const"] = "?", meta["bare"]
        kw["help"] = kw["help"].replace("%", "%%")  # argparse %-formats help: "10%" would crash --help
        parser.add_argument(*names, **kw)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str | None = None) -> T:
    parser = build_parser(cls, prog=prog)
    ns = parser.parse_args(argv)
    values = vars(ns)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        _, optional, _ = _base_type(hints[f.name])
        v = values[f.name]
        if optional and isinstance(v, str) and v.lower() in ("none", "null", ""):
            values[f.name] = None
    return cls(**values)  # a config checks itself in __post_init__, however it is built


# File-system failures a user causes and can fix (a folder that is a file, no permission, a full disk),
# with the fix; any other OSError, like any other exception, is a bug and keeps its traceback.
OS_FIXES: dict[int, str] = {
    errno.EACCES: "check its permissions, or choose a path you can write to",
    errno.EPERM: "check its permissions, or choose a path you can write to",
    errno.EROFS: "choose a path on a writable disk",
    errno.ENOSPC: "free some disk space, or choose an output folder on another disk",
    errno.EDQUOT: "free some of your disk quota, or choose an output folder on another disk",
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder where a file was expected: choose another path",
    errno.EEXIST: "a file is in the way of a folder: choose another path, or move the file",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def free_space(path: str | Path) -> str:
    """The free space on the disk holding ``path`` (or its nearest existing folder), e.g. '12.3 MB free'."""
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return f"{free / 1e9:.1f} GB free" if free >= 1e9 else f"{free / 1e6:.1f} MB free"


def os_error_line(e: OSError) -> str:
    """``path: reason; fix`` for an expected file-system failure (with the free space when the disk is full)."""
    reason = (e.strerror or str(e)).lower()
    where = f"{e.filename}: " if e.filename is not None else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename is not None:
        reason += f" ({free_space(e.filename)})"
    return f"{where}{reason}; {OS_FIXES[e.errno]}"


# Files only one stage writes: a folder holding one is that stage's output, and no other stage may write there
# (a classifier's summary.json would replace build_captions' own, generated splits the real ones a classifier reads).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "build_captions.py": ("captions.jsonl",),
    "the image analyzer": ("measured.jsonl",),
    "diffusion training": ("model_index.json", "pytorch_lora_weights.safetensors", "checkpoint-*"),
    "VAE training": ("diffusion_pytorch_model.safetensors",),
    "generate.py": ("generation_config.json", "manifest.csv", "single/manifest.csv"),
    "the export": ("data/*.parquet",),
    "classifier training": ("history.jsonl", "fold-*/history.jsonl"),
    "the classifier comparison": ("compare.md",),
    "evaluation": ("evaluation.json",),
    "the demo": ("report.html",),
    "the paper experiment": ("results.json",),
    "the mixing recipes": ("recipes.json",),
    "the audit": ("audit.json", "manifest.csv"),
    "the filter": ("filter.json",),
}


def check_not_another_stage(output: str | Path, stage: str, flag: str = "--output_dir") -> None:
    """Refuse an output folder that holds another stage's output: this stage's files would stand in its place. A file
    both stages write (the audit's manifest.csv) is its own where this stage wrote it."""
    own = {m for p in STAGE_OUTPUTS[stage] for m in Path(output).glob(p)}
    for other, patterns in STAGE_OUTPUTS.items():
        found = (
            next((m for p in patterns for m in Path(output).glob(p) if m not in own), None) if other != stage else None
        )
        if found is not None:
            raise InputError(
                f"{flag} {output}",
                f"already holds the output of {other} ({found.relative_to(output)}); this run would write among it",
                f"choose a new folder for {flag}",
            )


def run_stage(
    stage: Callable[[T], Any],
    cls: type[T],
    argv: Sequence[str] | None,
    prog: str,
    name: str,
    reads: Sequence[str] = (),
    tables: Sequence[str] = (),
    output: Callable[[T], str | Path] | None = None,
) -> int:
    """Parse a stage's flags and run it holding its output folder: locked against a second run, apart from every
    path it reads (``reads``, field names; for ``tables``, an image table's folder), never another stage's output.

    ``name`` is the stage's key in STAGE_OUTPUTS; ``output`` finds the folder (default: ``cfg.output_dir``)."""

    if name not in STAGE_OUTPUTS:
        raise ValueError(f"{name!r} is not a stage of STAGE_OUTPUTS: its own output would be refused")

    def go() -> None:
        cfg = parse_config(cls, argv, prog=prog)
        out = output(cfg) if output else cfg.output_dir
        inputs = {}
        for field in [f for f in reads if getattr(cfg, f)]:
            path = Path(getattr(cfg, field))
            inputs[f"--{field}"] = path.parent if field in tables and path.is_file() else path
        check_output_apart(out, inputs)
        check_not_another_stage(out, name)
        with output_lock(out):
            stage(cfg)

    return run(go)


# train_lora.sh and train_SD.sh name a file here: accelerate launch reports any failed run as exit code 1, so the
# run's own code (2 for bad input, said in one line) reaches the script this way.
EXIT_STATUS_ENV = "LESIONGEN_EXIT_STATUS_FILE"


def run(fn: Callable[[], Any]) -> int:
    """Run a stage; bad input and expected file-system failures become one line on stderr and exit code 2."""
    code = 1  # a bug, whose traceback is its message
    try:
        code = _exit_code(fn)
    except SystemExit as e:  # argparse's usage error (2, its message already printed) or --help (0)
        code = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        if os.environ.get(EXIT_STATUS_ENV):
            Path(os.environ[EXIT_STATUS_ENV]).write_text(f"{code}\n")
    return code


def _exit_code(fn: Callable[[], Any]) -> int:
    try:
        fn()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in OS_FIXES:
            raise
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; every file already written is complete, and a rerun continues or redoes the rest",
            file=sys.stderr,
        )
        return 130
    return 0
