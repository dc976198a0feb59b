"""Where a training run's examples come from: a folder with ``metadata.jsonl`` (``--train_data_dir``, what
build_captions.py writes) or any dataset ``datasets.load_dataset`` reads (``--dataset_name``: a Hub dataset id,
a local imagefolder, the parquet folder ``python -m lesiongen.diffusion.export`` writes, a parquet file).

Either way every row is checked before training starts, as ``dataset.read_examples`` checks a folder, and
the caption field is chosen the same way (``dataset.choose_caption_field``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .config import TrainConfig
from .dataset import (
    Example,
    StoredImage,
    check_example,
    choose_caption_field,
    find_metadata,
    metadata_columns,
    read_examples,
)


def load_examples(cfg: TrainConfig, parts: dict) -> tuple[list[Example], str]:
    """The run's checked examples and the caption field they carry."""
    family = parts["family"]
    tokenizers = [parts[family.caption_tokenizer]]
    if cfg.dataset_name is not None:
        return read_dataset(cfg, tokenizers, family)
    field = cfg.caption_field or choose_caption_field(
        metadata_columns(cfg.train_data_dir), family, str(find_metadata(cfg.train_data_dir))
    )
    return read_examples(cfg.train_data_dir, tokenizers, field), field


def open_dataset(name: str):
    """The train split of ``name``: a parquet file, a local dataset folder or a Hub dataset id."""
    import datasets

    flag = f"--dataset_name {name}"
    path = Path(name).expanduser()
    try:
        if path.is_file():
            if path.suffix != ".parquet":
                raise InputError(
                    flag, "is a file, not a parquet file", "pass a parquet file, a dataset folder or a Hub id"
                )
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        return datasets.load_dataset(str(path) if path.is_dir() else name, split="train")
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise InputError(
            flag,
            f"is neither a local dataset folder or parquet file nor a reachable Hub dataset ({str(e).splitlines()[0]})",
            "check the path or the Hub id (a gated dataset needs hf auth login), or pass --train_data_dir",
        ) from None
    except ValueError as e:  # no train split
        raise InputError(flag, str(e).splitlines()[0], "name the training split 'train'") from None


def read_dataset(cfg: TrainConfig, tokenizers: list, family) -> tuple[list[Example], str]:
    """Examples of a ``datasets`` dataset: files it points at stay files, embedded image bytes are read by row."""
    import datasets

    name = cfg.dataset_name
    table = open_dataset(name)
    columns = set(table.column_names)
    listed = ", ".join(table.column_names)
    if cfg.image_column not in columns:
        raise InputError(
            f"--image_column {cfg.image_column}",
            f"{name} has no such column (its columns: {listed})",
            "pass --image_column naming its image column",
        )
    if not isinstance(table.features[cfg.image_column], datasets.Image):
        raise InputError(
            f"--image_column {cfg.image_column}",
            f"is not an image column of {name} (it holds {table.features[cfg.image_column]})",
            f"pass --image_column naming its image column (columns: {listed})",
        )
    field = cfg.caption_field or choose_caption_field(columns, family, name)
    if field not in columns:
        raise InputError(
            f"--caption_column {field}",
            f"{name} has no such column (its columns: {listed})",
            "pass --caption_column naming its caption column",
        )
    table = table.cast_column(cfg.image_column, datasets.Image(decode=False))
    label_feature = table.features.get("label")
    label_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    examples = []
    for i, row in enumerate(table):
        where = f"--dataset_name {name} row {i}"
        cell, caption = row[cfg.image_column], row[field]
        if cell is None or not isinstance(caption, str):
            raise InputError(where, f"has no image or no {field} caption", "fill it in, or leave the row out")
        local = Path(cell["path"]) if cell.get("path") and cell.get("bytes") is None else None
        image = local if local is not None and local.is_file() else StoredImage(table, cfg.image_column, i, name)
        check_example(where, image, caption, tokenizers, field)
        label = row.get("label")
        label = label_names[label] if label_names and isinstance(label, int) else label
        examples.append(Example(image, caption, None if label is None else str(label), i, row.get("caption_style")))
    if not examples:
        raise InputError(f"--dataset_name {name}", "its train split has no rows", "pass a dataset with images")
    return examples, field
