"""Find each dataset's metadata CSV and rename it to the ``metadata.csv`` the scripts expect.

A CSV qualifies when its header has the dataset's required columns. Several candidates are an error
listing them (pass ``--source``), never a silent guess.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ..cli import option, parse_config, run
from ..errors import InputError
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


def rename_one(cfg: RenameConfig, dataset: str) -> str:
    folder = Path(cfg.data_dir) / dataset
    target = folder / TARGET
    if target.is_file() and not cfg.source:
        return f"{dataset}: {target} already in place"
    if not folder.is_dir() and cfg.dataset == "all":
        return f"{dataset}: {folder} not present, skipped"
    if not folder.is_dir():
        raise InputError(folder, "dataset folder not found", f"create it and put the {dataset} metadata CSV inside")
    if cfg.source:
        src = Path(cfg.source)
        if not src.is_file():
            raise InputError(src, "--source file not found", "check the path")
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
    verb = "copy" if cfg.copy else "rename"
    if not cfg.dry_run:
        if cfg.copy:
            shutil.copy2(src, target)
        else:
            src.replace(target)
    return f"{dataset}: {verb} {src} -> {target}" + (" (dry run)" if cfg.dry_run else "")


def rename_all(cfg: RenameConfig) -> list[str]:
    datasets = list(REQUIRED) if cfg.dataset == "all" else [cfg.dataset]
    done = [rename_one(cfg, d) for d in datasets]
    for line in done:
        print(line)
    return done


def main(argv: list[str] | None = None) -> int:
    return run(lambda: rename_all(parse_config(RenameConfig, argv, prog="rename_metadata.py")))


if __name__ == "__main__":
    sys.exit(main())
