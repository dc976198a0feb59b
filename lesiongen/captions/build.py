"""The ``build_captions.py`` stage: metadata -> captions -> lesion-grouped splits -> imagefolder.

Output layout (loadable with ``datasets.load_dataset("imagefolder", data_dir=OUT)``)::

    OUT/train/metadata.jsonl, OUT/train/images/...      (and validation/, test/)
    OUT/captions.jsonl                                  every captioned row, with its split
    OUT/summary.json                                    counts, skips, token lengths
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import labels
from ..cli import option, run_stage
from ..errors import InputError
from ..files import write_json, write_jsonl
from ..images import decode_problem, list_images
from ..tables import SPLITS
from ..tokens import CLIP_MAX_TOKENS, count_tokens
from .analyze import analysis_workers
from .concepts import impute_concepts
from .metadata import LOADERS, LesionRecord, LoadResult, load_metadata
from .reports import Reporter, ReportOptions
from .splits import D7P_INDEX_FILES, d7p_official_splits, split_by_lesion
from .text import STYLES, caption, record_rng
from .vlm import check_key_env_name

LINKS = ("symlink", "hardlink", "copy")


@dataclass
class BuildCaptionsConfig(ReportOptions):
    """Turn HAM10000 / Derm7pt metadata into a captioned, split imagefolder dataset."""

    dataset: str = option(help="which metadata schema to read", choices=tuple(LOADERS))
    metadata: str = option(help="the metadata CSV (HAM10000_metadata.csv or Derm7pt meta.csv)")
    output_dir: str = option(help="output folder for the imagefolder dataset", aliases=("--out",))
    images: str | None = option(None, help="image folder; omit to caption the metadata alone")
    style: str = option("concept", help="caption style", choices=tuple(STYLES))
    seed: int = option(0, help="seed for phrasing, imputed concepts and splits")
    skip_bad_rows: bool = option(
        False, help="skip (and count) bad rows and missing or corrupt images instead of stopping"
    )
    split_dir: str | None = option(
        None, help="Derm7pt folder with {train,valid,test}_indexes.csv (default: beside --metadata)"
    )
    split_fractions: list[float] = option(
        [0.8, 0.1, 0.1], help="train/validation/test fractions when no official split exists"
    )
    link: str = option("symlink", help="how images enter the output folder", choices=LINKS)

    def __post_init__(self) -> None:
        if self.images is not None and not Path(self.images).is_dir():
            problem = "is a file, not an image folder" if Path(self.images).exists() else "image folder not found"
            raise InputError(self.images, problem, "check --images, or omit it to caption metadata alone")
        analysis_workers(self.analysis_workers)
        check_key_env_name(self.vlm_api_key_env)


def index_images(folder: Path) -> dict[str, Path]:
    """Map lower-case relative path and stem -> file, so HAM's part_1/part_2 layouts both work."""
    index: dict[str, Path] = {}
    for p in list_images(folder):
        index.setdefault(p.relative_to(folder).as_posix().lower(), p)
        index.setdefault(p.stem.lower(), p)
    return index


def find_image(record: LesionRecord, index: dict[str, Path]) -> Path | None:
    keys = [record.image_path.lower()] if record.image_path else []
    keys.append(record.image_id.lower())
    return next((index[k] for k in keys if k in index), None)


def image_identities(path: Path) -> tuple[str, str]:
    """What makes two rows one image: the resolved file (ids that differ only in case, or a symlink,
    find the same file) and its content (a byte-identical copy). Either shared puts one image in
    two splits, so the later row is skipped and counted."""
    return str(path.resolve()), hashlib.sha256(path.read_bytes()).hexdigest()


def place_image(src: Path, dst: Path, how: str) -> None:
    """A symlink is relative (from the link's folder to the image), so the output folder and the image folder
    can be copied or moved together, to another disk or a cluster, and still load."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if how == "symlink":
        os.symlink(os.path.relpath(src.resolve(), dst.parent.resolve()), dst)
    elif how == "hardlink":
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def remove_stale(split_dir: Path, listed: set[str]) -> int:
    """Remove the images an earlier build placed in ``split_dir`` that this build does not list, and the
    split's metadata.jsonl when it lists none, so no reader ever sees a previous build's rows or images."""
    found = [p for p in (split_dir / "images").rglob("*") if p.is_symlink() or p.is_file()]
    stale = [p for p in found if p.relative_to(split_dir).as_posix() not in listed]
    if not listed and (split_dir / "metadata.jsonl").is_file():
        (split_dir / "metadata.jsonl").unlink()
    for p in stale:
        p.unlink()
    return len(stale)


def find_d7p_split_dir(metadata: Path) -> Path | None:
    """The official index files sit beside meta.csv, or in meta/ once rename_metadata.py moved it up."""
    for folder in (metadata.parent, metadata.parent / "meta"):
        if (folder / D7P_INDEX_FILES["train"]).is_file():
            return folder
    return None


def assign_splits(cfg: BuildCaptionsConfig, loaded: LoadResult) -> tuple[list[str], str]:
    """Derm7pt's official split where its index files are found, else lesion-grouped, stratified splits.

    The index files number the rows of the whole meta.csv, so they are checked against the file's row
    count, not against the rows --skip_bad_rows kept."""
    records = loaded.records
    split_dir = Path(cfg.split_dir) if cfg.split_dir else find_d7p_split_dir(Path(cfg.metadata))
    if cfg.dataset == "d7p" and split_dir is not None:
        official = d7p_official_splits(split_dir, loaded.n_rows)
        return [official[i] or "train" for i in loaded.rows], f"official ({split_dir})"
    fractions = tuple(cfg.split_fractions)
    if len(fractions) != 3:
        raise InputError("--split_fractions", "needs three numbers", "e.g. --split_fractions 0.8 0.1 0.1")
    splits = split_by_lesion([r.dx for r in records], [r.lesion_id for r in records], fractions, cfg.seed)
    return splits, "lesion-grouped, diagnosis-stratified"


def caption_record(record: LesionRecord, style: str, seed: int) -> tuple[LesionRecord, dict]:
    """Impute concepts where none were observed (concept style), caption, and return the row."""
    if style == "concept" and record.concept_source == "none":
        drawn = impute_concepts(record.dx, record_rng(seed, "concepts:" + record.image_id))
        if drawn:
            record.concepts, record.concept_source = drawn, "imputed"
    cap = caption(record, style, seed, fits=lambda t: count_tokens(t) <= CLIP_MAX_TOKENS)
    row = record.to_row()
    row.update(
        text=cap.text,
        label=record.dx,
        condition=labels.BY_CODE[record.dx].name if record.dx in labels.BY_CODE else labels.OTHER,
        caption_style=style,
        caption_seed=seed,
        caption_omitted=",".join(cap.omitted),  # a string: imagefolder infers one type per split
        n_tokens=count_tokens(cap.text),
    )
    return record, row


def build(cfg: BuildCaptionsConfig) -> dict:
    loaded = load_metadata(cfg.dataset, cfg.metadata, cfg.skip_bad_rows)
    records = loaded.records
    skipped = {"bad_rows": loaded.skipped, "missing_images": [], "corrupt_images": [], "duplicate_images": []}
    splits, split_kind = assign_splits(cfg, loaded)
    out = Path(cfg.output_dir)
    images = Path(cfg.images) if cfg.images else None
    index = index_images(images) if images else {}
    reporter = Reporter.from_config(cfg, cfg.style, images, out)

    kept: list[dict] = []
    sources: list[tuple[LesionRecord, Path]] = []
    seen: dict[str, str] = {}  # an image's identity (resolved file, content hash) -> the image_id that has it
    for record, split in tqdm(list(zip(records, splits, strict=False)), desc="captions", unit="img", disable=None):
        src = None
        if images is not None:
            src = find_image(record, index)
            problem = None if src else "missing image"
            problem = problem or (f"unreadable image ({p})" if (p := decode_problem(src)) else None)
            if problem:
                where = src or images / (record.image_path or record.image_id + ".jpg")
                if not cfg.skip_bad_rows:
                    fix = "add the image" if src is None else "replace the image"
                    raise InputError(
                        where, f"{problem} for image_id {record.image_id}", f"{fix} or pass --skip_bad_rows"
                    )
                key = "missing_images" if problem == "missing image" else "corrupt_images"
                skipped[key].append(record.image_id)
                continue
            identities = image_identities(src)
            if first := next((seen[i] for i in identities if i in seen), None):
                skipped["duplicate_images"].append(f"{record.image_id} (same image as {first})")
                continue
            seen.update(dict.fromkeys(identities, record.image_id))
        record, row = caption_record(record, cfg.style, cfg.seed)
        row["split"] = split
        if src is not None:
            row["file_name"] = f"images/{record.image_path or src.name}"
            sources.append((record, src))
        kept.append(row)
    fits = lambda t: count_tokens(t) <= CLIP_MAX_TOKENS  # noqa: E731
    report_stats = reporter.apply(sources, kept, cfg.seed, fits) if reporter else None

    # every row is checked and captioned: only now does the output folder change
    placed: dict[tuple[str, str], Path] = {}
    if images is not None:
        placed = {(row["split"], row["file_name"]): src for row, (_, src) in zip(kept, sources, strict=True)}
    for (split, name), src in placed.items():
        place_image(src, out / split / name, cfg.link)
    removed, rebuild = 0, (out / "captions.jsonl").is_file()  # only a folder an earlier build wrote is tidied
    for split in SPLITS:
        split_rows = [{"file_name": r["file_name"], **r} for r in kept if (split, r.get("file_name")) in placed]
        removed += remove_stale(out / split, {name for s, name in placed if s == split}) if rebuild else 0
        if split_rows:
            write_jsonl(out / split / "metadata.jsonl", split_rows)
    write_jsonl(out / "captions.jsonl", kept)
    summary = summarize(cfg, kept, skipped, split_kind, images is not None)
    summary["stale_images_removed"] = removed
    if report_stats:
        summary["reports"] = report_stats
    write_json(out / "summary.json", summary)
    print_summary(summary, out)
    return summary


def summarize(cfg: BuildCaptionsConfig, rows: list[dict], skipped: dict, split_kind: str, checked: bool) -> dict:
    lengths = np.array([r["n_tokens"] for r in rows])
    omitted = Counter(f for r in rows for f in r["caption_omitted"].split(",") if f)
    return {
        "config": asdict(cfg),
        "images_checked": checked,
        "captioned": len(rows),
        "skipped": {k: len(v) for k, v in skipped.items()},
        "skipped_examples": {k: v[:20] for k, v in skipped.items()},
        "split_method": split_kind,
        "per_split": {s: dict(Counter(r["label"] for r in rows if r["split"] == s)) for s in SPLITS},
        "concept_source": dict(Counter(r["concept_source"] for r in rows)),
        "tokens": {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 1),
            "p95": int(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
            "limit": CLIP_MAX_TOKENS,
            "histogram": {
                f"{lo}-{lo + 9}": int(((lengths >= lo) & (lengths < lo + 10)).sum()) for lo in range(0, 80, 10)
            },
        },
        "omitted_facts": dict(omitted),
    }


def print_summary(s: dict, out: Path) -> None:
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in s["skipped"].items() if v) or "none"
    print(f"captioned {s['captioned']} images ({s['config']['style']} style); skipped: {skipped}")
    if not s["images_checked"]:
        print("no --images given: captions are keyed by image_id and no image was checked")
    counts = ", ".join(f"{k} {sum(v.values())}" for k, v in s["per_split"].items())
    print(f"splits ({s['split_method']}): {counts}")
    t = s["tokens"]
    print(f"CLIP tokens: min {t['min']}, mean {t['mean']}, p95 {t['p95']}, max {t['max']} (limit {t['limit']})")
    if s["stale_images_removed"]:
        print(f"removed {s['stale_images_removed']} image(s) an earlier build placed and this one does not list")
    if s["omitted_facts"]:
        print(f"facts shortened to fit the window: {s['omitted_facts']}")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        build,
        BuildCaptionsConfig,
        argv,
        "build_captions.py",
        "build_captions.py",
        reads=("metadata", "images", "split_dir"),
    )


if __name__ == "__main__":
    sys.exit(main())
