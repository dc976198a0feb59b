"""Dataclass configs become argparse parsers, and every ``main`` exits with one line on bad input.

A flag is declared once, as a dataclass field: its name is the flag, ``metadata["help"]`` the help
text, ``metadata["choices"]`` the valid values and ``metadata["aliases"]`` extra spellings.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .errors import InputError

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


def os_error_line(e: OSError) -> str:
    """``path: reason; fix`` for an expected file-system failure."""
    reason = (e.strerror or str(e)).lower()
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"{where}{reason}; {OS_FIXES[e.errno]}"


def run(fn: Callable[[], Any]) -> int:
    """Run a stage; bad input and expected file-system failures become one line on stderr and exit code 2."""
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
