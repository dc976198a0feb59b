"""Find each dataset's metadata CSV and rename it to the ``metadata.csv`` the scripts expect.

A CSV qualifies when its header has the dataset's required columns. Several candidates are an error
listing them (pass ``--source``), never a silent guess. Nothing is overwritten: a ``metadata.csv``
that ``--source`` replaces is kept as ``metadata.csv.<n>.bak``, and each step is printed as it is
done, so a later failure leaves a record of what already moved.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cli import option, parse_config, run
from ..errors import InputError, not_utf8
from .metadata import D7P_COLUMNS, HAM_COLUMNS

TARGET = "metadata.csv"
REQUIRED = {"ham10000": HAM_COLUMNS, "d7p": D7P_COLUMNS}


@dataclass
class RenameConfig:
    """Rename downloaded metadata files to data/<dataset>/metadata.csv."""

    data_dir: str = option("data", help="folder holding ham10000/ and d7p/")
    dataset: str = option("all", help="which dataset folder to fix", choices=("all", *REQUIRED))
    source: str | None = option(None, help="the CSV to use when several qualify (needs a single --dataset)")
    copy: bool = option(False, help="copy instead of rename (keeps the original name in place)")
    dry_run: bool = option(False, help="only print what would happen")

    def __post_init__(self) -> None:
        if not Path(self.data_dir).is_dir():
            raise InputError(
                f"--data_dir {self.data_dir}", "folder not found", "pass the folder holding ham10000/ and d7p/"
            )
        if self.source and self.dataset == "all":
            raise InputError("--source", "needs one --dataset", "add --dataset ham10000 or --dataset d7p")


def header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [c.strip() for c in f.readline().strip().split(",")]
    except (UnicodeDecodeError, OSError):
        return []


def candidates(folder: Path, dataset: str) -> list[Path]:
    """CSV files up to two levels down whose header has every required column."""
    required = set(REQUIRED[dataset])
    found = [p for p in sorted(folder.glob("*.csv")) + sorted(folder.glob("*/*.csv")) if p.name != TARGET]
    return [p for p in found if required <= set(header(p))]


def backup_name(target: Path) -> Path:
    """The first free ``<name>.<n>.bak`` beside ``target``; ``.bak`` keeps it out of the ``*.csv`` search."""
    n = 1
    while target.with_name(f"{target.name}.{n}.bak").exists():
        n += 1
    return target.with_name(f"{target.name}.{n}.bak")


def rename_one(cfg: RenameConfig, dataset: str) -> str:
    folder = Path(cfg.data_dir) / dataset
    target = folder / TARGET
    if target.is_file() and (not cfg.source or Path(cfg.source).resolve() == target.resolve()):
        return f"{dataset}: {target} already in place"
    if not folder.is_dir() and cfg.dataset == "all":
        return f"{dataset}: {folder} not present, skipped"
    if not folder.is_dir():
        raise InputError(folder, "dataset folder not found", f"create it and put the {dataset} metadata CSV inside")
    if cfg.source:
        src = Path(cfg.source)
        if not src.is_file():
            raise InputError(src, "--source file not found", "check the path")
        try:
            src.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise not_utf8(src) from None
        if not set(REQUIRED[dataset]) <= set(header(src)):
            raise InputError(src, f"lacks the {dataset} columns {', '.join(REQUIRED[dataset])}", "pick the right CSV")
    else:
        found = candidates(folder, dataset)
        if not found:
            raise InputError(
                folder, f"no CSV with the {dataset} columns found", "download the metadata (see README.md)"
            )
        if len(found) > 1:
            names = ", ".join(str(p) for p in found)
            raise InputError(folder, f"several metadata candidates: {names}", "pass --source with the one to use")
        src = found[0]
    line = f"{dataset}: {'copy' if cfg.copy else 'rename'} {src} -> {target}"
    backup = backup_name(target) if target.exists() else None
    if backup is not None:
        line += f" (the previous {TARGET} kept as {backup.name})"
    if cfg.dry_run:
        return line + " (dry run)"
    if backup is not None:
        target.rename(backup)
    if cfg.copy:
        shutil.copy2(src, target)
    else:
        shutil.move(src, target)  # a --source on another disk cannot simply be renamed
    return line


def rename_all(cfg: RenameConfig) -> list[str]:
    """Each dataset in turn, printing what was done before the next one starts."""
    datasets = list(REQUIRED) if cfg.dataset == "all" else [cfg.dataset]
    done = []
    for dataset in datasets:
        done.append(rename_one(cfg, dataset))
        print(done[-1], flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    return run(lambda: rename_all(parse_config(RenameConfig, argv, prog="rename_metadata.py")))


if __name__ == "__main__":
    sys.exit(main())
