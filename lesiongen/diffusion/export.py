"""Export a generated set (``generate.py --mode dataset`` output) as a Hugging Face dataset of parquet shards.

    python -m lesiongen.diffusion.export --input_dir synth --output_dir synth-hf [--rows_per_shard 1000]
    accelerate launch -m lesiongen.diffusion.export ...      # every process writes its share of the shards

The result loads as any hub dataset does, whole or streamed, with images decoded and labels named::

    ds = datasets.load_dataset("synth-hf", split="train")            # or streaming=True
    ds = datasets.load_dataset("parquet", data_files="synth-hf/data/train-*.parquet", split="train")

Rows are the manifest's rows sorted by file name, with the PNG bytes embedded (the folder is
self-contained), ``label`` a ClassLabel over the dx codes of ``labels.py`` and every other manifest
column kept. Each shard is written under a temporary name and renamed when complete, and a rerun keeps
the shards that already hold the right rows, so a killed export resumes.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import labels
from ..cli import option, run_stage
from ..errors import InputError
from ..files import atomic_path, write_text
from ..images import IMAGE_SUFFIXES, PIL_ERRORS
from ..tables import MANIFEST, read_image_table
from .manifest import DATASET_COLUMNS, FLOAT_COLUMNS, INTEGER_COLUMNS, typed_row

SHARD_RE = re.compile(r"^(?P<split>\w+)-(\d{5})-of-(\d{5})\.parquet$")


@dataclass
class ExportConfig:
    """Export generate.py's images and manifest.csv as parquet shards that datasets.load_dataset reads."""

    input_dir: str = option(help="a generate.py --output_dir (manifest.csv beside dataset/<Condition>/...)")
    output_dir: str = option(help="the dataset folder to write (data/<split>-NNNNN-of-NNNNN.parquet, README.md)")
    split: str = option("train", help="split name in the shard file names")
    rows_per_shard: int = option(
        1000, help="images per parquet file (1000 PNGs are ~10 MB at 64 px, ~400 MB at 512 px)"
    )

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise InputError("--rows_per_shard", "must be at least 1", "e.g. 1000")
        if not re.fullmatch(r"\w+", self.split):
            raise InputError("--split", f"'{self.split}' is not a split name", "use letters, digits and _")


@dataclass(frozen=True)
class ExportResult:
    output_dir: Path
    rows: int
    shards: int
    written: int  # shards written by this process in this call


def features():
    """The column types: the image, the label as a ClassLabel, typed numbers, every other column a string."""
    import datasets

    columns = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(labels.CODES))}
    for name in DATASET_COLUMNS:
        if name == "label":
            continue
        kind = "int64" if name in INTEGER_COLUMNS else "float64" if name in FLOAT_COLUMNS else "string"
        columns[name] = datasets.Value(kind)
    return datasets.Features(columns)


def embed_problem(path: Path, root: Path) -> str | None:
    """Why a manifest row's file must not go into the parquet, or None: an export is shared, and a row naming
    ``../secret.env``, an absolute path, or a link out of the set would carry that file's bytes with it."""
    from PIL import Image

    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        return "outside the set's folder"
    try:
        with Image.open(real) as image:  # reads the header: a text file named .png is not identified
            known = image.format is not None
    except PIL_ERRORS:
        known = False
    return None if known and real.suffix.lower() in IMAGE_SUFFIXES else "not an image"


def read_rows(input_dir: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """The manifest's rows (through the one image-table reader: labels checked, images present), sorted by file,
    and the file names left out by reason (``embed_problem``)."""
    if not (input_dir / MANIFEST).is_file():
        raise InputError(
            f"--input_dir {input_dir}", f"has no {MANIFEST}", "pass the --output_dir of generate.py --mode dataset"
        )
    frame = read_image_table(input_dir / MANIFEST).sort_values("file_name", kind="stable")
    rows, left_out = [], {}
    for row in frame.to_dict("records"):
        problem = embed_problem(Path(row["path"]), input_dir)
        if problem is not None:
            left_out.setdefault(problem, []).append(row["file_name"])
            continue
        out = typed_row(row, input_dir / MANIFEST)
        out["path"] = row["path"]
        rows.append(out)
    if not rows:
        raise InputError(input_dir / MANIFEST, "names no image inside the set's folder", "regenerate the set")
    return rows, left_out


def shard_name(split: str, shard: int, n_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{n_shards:05d}.parquet"


def holds(path: Path, file_names: list[str]) -> bool:
    """True when the shard file exists and holds exactly these images (complete files only get a final name)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return False
    try:
        return pq.read_table(path, columns=["file_name"]).column("file_name").to_pylist() == file_names
    except (OSError, ValueError, KeyError):
        return False


def write_shard(rows: list[dict], path: Path) -> None:
    """One parquet file through datasets (its schema carries the feature types that load_dataset restores)."""
    import datasets

    table = {name: [r[name] for r in rows] for name in DATASET_COLUMNS}
    table["label"] = [labels.CODES.index(r["label"]) for r in rows]
    table["image"] = [{"bytes": Path(r["path"]).read_bytes(), "path": r["file_name"]} for r in rows]
    with atomic_path(path) as tmp:
        datasets.Dataset.from_dict(table, features=features()).to_parquet(str(tmp))


def dataset_card(cfg: ExportConfig, rows: list[dict], n_shards: int) -> str:
    counts = {code: sum(r["label"] == code for r in rows) for code in labels.CODES}
    models = sorted({r["model"] for r in rows})
    per_label = "\n".join(f"| `{c}` | {labels.BY_CODE[c].name} | {n} |" for c, n in counts.items() if n)
    return f"""---
configs:
- config_name: default
  data_files:
  - split: {cfg.split}
    path: data/{cfg.split}-*
---
# LesionGen synthetic dermoscopy images

{len(rows)} images generated by `generate.py` into `{cfg.input_dir}` (model: {", ".join(models)}), exported by
`python -m lesiongen.diffusion.export` as {n_shards} parquet shard(s). Every column of the generation
manifest is kept (caption `text`, subgroup fields, concepts, seed, sampler settings); `label` is a
ClassLabel over the dx codes. Synthetic medical images are for research, not diagnosis.

```python
from datasets import load_dataset
ds = load_dataset("{cfg.output_dir}", split="{cfg.split}")   # streaming=True to iterate without a local copy
```

| label | condition | images |
|---|---|---|
{per_label}
"""


def export(cfg: ExportConfig) -> ExportResult:
    """Write the shards this process owns (i, i + world, ...) that do not already hold their rows, then the card."""
    from accelerate import PartialState

    state = PartialState()
    out = Path(cfg.output_dir)
    rows, left_out = read_rows(Path(cfg.input_dir))
    if left_out and state.is_main_process:
        counts = ", ".join(f"{len(names)} {why}" for why, names in left_out.items())
        print(
            f"{Path(cfg.input_dir) / MANIFEST}: left out {sum(map(len, left_out.values()))} row(s) ({counts}, "
            f"e.g. {next(iter(left_out.values()))[0]}); an export embeds only the set's own images",
            file=sys.stderr,
        )
    n_shards = -(-len(rows) // cfg.rows_per_shard)
    names = [shard_name(cfg.split, s, n_shards) for s in range(n_shards)]
    data = out / "data"
    if state.is_main_process:
        data.mkdir(parents=True, exist_ok=True)
        for p in data.iterdir():
            split_shard = SHARD_RE.match(p.name)
            stale = split_shard and split_shard["split"] == cfg.split and p.name not in names
            if stale or (p.name.startswith(f".{cfg.split}-") and p.name.endswith(".tmp")):
                p.unlink()
    state.wait_for_everyone()
    written = 0
    for s in range(state.process_index, n_shards, state.num_processes):
        part = rows[s * cfg.rows_per_shard : (s + 1) * cfg.rows_per_shard]
        if not holds(data / names[s], [r["file_name"] for r in part]):
            write_shard(part, data / names[s])
            written += 1
    state.wait_for_everyone()
    if state.is_main_process:
        write_text(out / "README.md", dataset_card(cfg, rows, n_shards))
        print(f"exported {len(rows)} images as {n_shards} parquet shard(s) to {data} ({written} written here)")
    return ExportResult(out, len(rows), n_shards, written)


def main(argv: list[str] | None = None) -> int:
    return run_stage(export, ExportConfig, argv, "python -m lesiongen.diffusion.export", "the export", ("input_dir",))


if __name__ == "__main__":
    sys.exit(main())
