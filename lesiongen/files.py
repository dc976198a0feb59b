"""Atomic writes, append-safe JSONL, and the output folder a run claims.

A killed process must never leave a half-written file under a final name: every writer goes through
a temporary sibling followed by ``os.replace``. A write that fails (a full disk) names the output it
was for, so ``cli.run`` can say which file could not be written. A run holds its output folder
(``output_lock``) and never writes into a folder it reads (``check_output_apart``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InputError

try:  # flock: absent on Windows, where runs are single-process and go unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_NAME = ".lesiongen.lock"
# flock's answers on a file system without locks (an NFS mount without lockd, some FUSE mounts)
UNLOCKABLE = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


# Under this much free space, a failed write is taken for a full disk: torch.save and safetensors report one as a
# RuntimeError ("unexpected pos 704 vs 598") or their own error, without errno, measured on a full tmpfs.
FULL_DISK_BYTES = 1 << 20


@contextmanager
def naming_failures(path: Path) -> Iterator[None]:
    """Give a failed write the output's name: ``write()`` raises ENOSPC without one, and torch.save and safetensors
    raise no OSError at all on a full disk; such a failure becomes ``OSError(ENOSPC, path)``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    except Exception as e:
        folder = path.parent if path.parent.exists() else Path.cwd()
        if isinstance(e, InputError) or shutil.disk_usage(folder).free >= FULL_DISK_BYTES:
            raise
        raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the permissions open() would give
    tmp_path = Path(tmp)
    try:
        with naming_failures(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one complete line and fsync, so a kill loses at most the row being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_failures(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file, ignoring a torn last line left by a kill mid-append."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when complete (replacing an earlier
    version of it; a file in its place is an error, never replaced)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        with naming_failures(path):
            yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _open_locked(path: Path) -> int | None:
    """The descriptor of ``path`` exclusively locked, or None if another process holds it.

    A holder that finishes unlinks the file; the loop makes sure the locked file is still the one at ``path``,
    so two runs can never each hold a different copy."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


@contextmanager
def output_lock(folder: str | Path, flag: str = "--output_dir") -> Iterator[None]:
    """Hold ``folder`` for one run, so a second run into it stops instead of silently replacing its results.

    The kernel releases a flock when its holder dies, so a lock left by a killed run is free: it is taken over and
    named. Only the main process of a distributed launch (RANK 0) takes it; the other ranks write under its lock.
    """
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = _open_locked(path)
    except OSError as e:
        if e.errno not in UNLOCKABLE:
            raise
        path.unlink(missing_ok=True)
        print(f"note: {folder}: its file system cannot lock files ({e.strerror}); nothing stops a second run into it")
        yield
        return
    if fd is None:
        raise InputError(
            f"{flag} {folder}",
            f"another run is writing here ({_holder(path) or 'a process that is starting'})",
            "wait for it to finish, or choose another folder",
        )
    try:
        stale = _holder(path)
        if stale:
            print(f"note: {path}: taking over the lock left by {stale}, which ended without releasing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        try:  # the folder may have been replaced whole (atomic_dir): remove only our own lock file
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a run that failed before writing leaves no empty folder behind


def check_output_apart(output: str | Path, inputs: dict[str, str | Path], flag: str = "--output_dir") -> None:
    """Refuse an output folder that is, contains or lies inside a folder the run reads (symlinks resolved): writing
    there turns image links into self-loops, replaces the splits being read, or deletes the images themselves.

    ``inputs`` maps each input flag to its path; one that does not exist here (a hub id, a missing path the stage
    reports itself) is skipped."""
    out = Path(output).resolve()
    for name, value in inputs.items():
        source = Path(value)
        if not source.exists():
            continue
        source = source.resolve()
        if out == source or out.is_relative_to(source) or source.is_relative_to(out):
            relation = "is" if out == source else "lies inside" if out.is_relative_to(source) else "contains"
            raise InputError(
                f"{flag} {output}",
                f"{relation} {name} {value}, which this run reads; writing there would overwrite its input",
                f"choose a folder outside {value} for {flag}",
            )
