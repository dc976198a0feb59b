"""Torch datasets for diffusion training from a folder holding ``metadata.jsonl`` (file_name and a caption field).

Each item of the endless training stream is planned from (seed, item number) alone: which image,
whether it is flipped, whether its caption is dropped, which parts of the caption it keeps. So an
interrupted run resumes on exactly the items it would have seen, any micro-batch size trains on the
same items, and the cached-latent path picks the same flip the image path would have applied.
"""

from __future__ import annotations

import functools
import io
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as F

from ..errors import InputError
from ..images import decode_problem, image_size, open_rgb
from ..tables import leaves_folder, read_metadata
from .families import tokenize

# (image index, flipped, caption dropped, item number in the stream): what a sampler asks a dataset for.
ItemKey = tuple[int, bool, bool, int]


@dataclass(frozen=True, eq=False)
class StoredImage:
    """An image held inside a ``datasets`` table (a parquet export, a Hub dataset), read by row when a step needs it,
    so a dataset of embedded images is never copied out to files."""

    table: Any  # a datasets.Dataset whose image column is not decoded: {"bytes", "path"} cells
    column: str
    index: int
    name: str  # the dataset as the user named it, for messages

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.table[self.index][self.column]["bytes"])

    def __str__(self) -> str:
        return f"{self.name} row {self.index}"


@dataclass(frozen=True)
class Example:
    image: Path | StoredImage
    text: str
    label: str | None
    row: int  # 1-based line in metadata.jsonl (or dataset row), for error messages
    caption_style: str | None = None  # as build_captions.py records it, for the model card


def image_file(image: Path | StoredImage) -> Path | io.BytesIO:
    """What PIL opens for an example's image: the file, or the bytes of a dataset row."""
    return image.open() if isinstance(image, StoredImage) else image


def image_identity(image: Path | StoredImage) -> str:
    """Changes when the image may have: a file's resolved path, size and modification time, or the dataset's
    fingerprint (datasets derives it from the data files) and the row."""
    if isinstance(image, StoredImage):
        return f"{image.table._fingerprint}:{image.column}:{image.index}"
    st = image.stat()
    return f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def choose_caption_field(columns: set[str], family, source: str) -> str:
    """The caption field a run trains on when none is asked for: the family's (``long_text`` for the T5
    families) where every row has it, else ``text`` where every row has that, as diffusers' scripts default to,
    said in one line. Otherwise the family's, so the row check names the first row without it."""
    if family.caption_field in columns or "text" not in columns:
        return family.caption_field
    print(
        f"note: {family.name} trains on {family.caption_field} by default; {source} does not have it in every "
        "row, so it trains on text (pass --caption_column to choose)",
        file=sys.stderr,
    )
    return "text"


def metadata_columns(train_data_dir: str | Path) -> set[str]:
    """The fields every row of the folder's metadata.jsonl has."""
    rows = [set(row) for _, row in read_metadata(find_metadata(train_data_dir))]
    return set.intersection(*rows) if rows else set()


def check_example(where: str, image: Path | StoredImage, caption: str, tokenizers, caption_field: str) -> None:
    """The image decodes completely and the caption fits every tokenizer's window (no caption silently cut)."""
    problem = decode_problem(image_file(image))
    if problem:
        raise InputError(where, f"image {image} cannot be read ({problem})", "replace the image or remove its row")
    for tokenizer in tokenizers:
        n = len(tokenizer(caption, truncation=False, verbose=False).input_ids)
        if n > tokenizer.model_max_length:
            raise InputError(
                where,
                f"caption has {n} tokens, more than the text encoder's {tokenizer.model_max_length} ({caption_field} field)",
                "shorten it (build_captions.py fits captions to the window), or train on another --caption_field",
            )


def find_metadata(train_data_dir: str | Path) -> Path:
    """``DIR/metadata.jsonl``, or ``DIR/train/metadata.jsonl`` when given a build_captions output root."""
    root = Path(train_data_dir)
    for candidate in (root / "metadata.jsonl", root / "train" / "metadata.jsonl"):
        if candidate.is_file():
            return candidate
    if not root.exists():
        raise InputError(
            f"--train_data_dir {root}", "folder not found", "pass the folder build_captions.py wrote (OUT/train)"
        )
    raise InputError(
        f"--train_data_dir {root}",
        "no metadata.jsonl here or in train/",
        "pass a folder with metadata.jsonl rows holding file_name and text (build_captions.py writes OUT/train)",
    )


def read_examples(train_data_dir: str | Path, tokenizers=(), caption_field: str = "text") -> list[Example]:
    """Read and check every row before training starts: image present and fully decodable, caption (the row's
    ``caption_field``) within every tokenizer's window, so no caption is silently cut."""
    meta = find_metadata(train_data_dir)
    folder = meta.parent
    examples = []
    for i, row in read_metadata(meta):
        where = f"{meta} row {i}"
        if not row.get("file_name") or not isinstance(row.get(caption_field), str):
            fix = "rebuild it with build_captions.py"
            if caption_field != "text":
                fix = f"build captions with reports (build_captions.py writes {caption_field} on that path), or pass --caption_field text"
            raise InputError(where, f"needs a file_name and a {caption_field} field", fix)
        if leaves_folder(row["file_name"]):
            raise InputError(
                where,
                f"file_name '{row['file_name']}' is outside {folder}",
                "list images by paths inside the folder (build_captions.py writes images/<file>)",
            )
        path = folder / row["file_name"]
        if not path.is_file():
            raise InputError(where, f"image {path} not found", "restore the image or remove its row")
        check_example(where, path, row[caption_field], tokenizers, caption_field)
        examples.append(Example(path, row[caption_field], row.get("label"), i, row.get("caption_style")))
    if not examples:
        raise InputError(meta, "no training examples", f"add rows with file_name and {caption_field}")
    return examples


def frame_image(img, resolution: int, center_crop: bool) -> tuple[torch.Tensor, tuple[int, int], int]:
    """Resize the short side, crop square, scale to [-1, 1]: (pixels, the crop's (top, left) in the resized
    image, the resized width). Flips are applied by the batch plan, not here."""
    img = F.resize(img, resolution, interpolation=F.InterpolationMode.BILINEAR)
    if center_crop:
        top, left = (int(round((side - resolution) / 2.0)) for side in (img.height, img.width))
    else:
        top, left, _, _ = transforms.RandomCrop.get_params(img, (resolution, resolution))
    x = F.normalize(F.to_tensor(F.crop(img, top, left, resolution, resolution)), [0.5], [0.5])
    return x, (top, left), img.width


@functools.lru_cache(maxsize=2)
def epoch_order(n_examples: int, seed: int, epoch: int, weights: tuple[float, ...] | None = None) -> list[int]:
    """Epoch ``epoch``'s order: a seeded permutation, or with ``weights`` a seeded weighted draw with
    replacement (class-balanced sampling). Cached, since every item of the epoch looks it up."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if weights is None:
        return torch.randperm(n_examples, generator=g).tolist()
    return torch.multinomial(torch.tensor(weights, dtype=torch.double), n_examples, True, generator=g).tolist()


def plan_item(
    item: int,
    n_examples: int,
    seed: int,
    random_flip: bool,
    caption_dropout: float,
    weights: tuple[float, ...] | None = None,
) -> ItemKey:
    """Item ``item`` of an endless shuffled stream, a pure function of (seed, item): no state to save.

    Epoch e is a seeded permutation (or weighted draw); the flip and the caption drop are drawn per item,
    so how items are grouped into micro-batches and processes changes nothing about what each item is.
    """
    epoch, position = divmod(item, n_examples)
    g = torch.Generator().manual_seed(seed * 7_919 + item * 104_729 + 17)
    flip_draw, drop_draw = torch.rand(2, generator=g).tolist()
    return (
        epoch_order(n_examples, seed, epoch, weights)[position],
        random_flip and flip_draw < 0.5,
        drop_draw < caption_dropout,
        item,
    )


def class_balanced_weights(examples: list[Example]) -> tuple[float, ...]:
    """Per-image sampling weight 1 / (images of its class), so every class is drawn equally often.

    On the demo's long-tailed classes this gave the rare red and pink lesions as many updates as the
    common brown naevi, which the generator otherwise rendered as brown.
    """
    missing = [ex.row for ex in examples if not ex.label]
    if missing:
        raise InputError(
            "--balance_classes",
            f"{len(missing)} metadata rows have no label (e.g. line {missing[0]})",
            "rebuild the captions with build_captions.py, or drop --balance_classes",
        )
    counts = Counter(ex.label for ex in examples)
    return tuple(1.0 / counts[ex.label] for ex in examples)


class PlannedBatches(torch.utils.data.Sampler):
    """Endless micro-batches of the item stream from optimiser step ``start_step`` on.

    Optimiser step s takes ``per_step`` items from each of ``world`` processes: process r gets items
    (s * world + r) * per_step onwards, in micro-batches of ``micro_batch``. Any micro-batch size that
    divides ``per_step`` therefore trains on the same items, and resume at step s is exact.
    """

    def __init__(
        self,
        n_examples: int,
        per_step: int,
        micro_batch: int,
        seed: int,
        random_flip: bool,
        caption_dropout: float,
        start_step: int = 0,
        rank: int = 0,
        world: int = 1,
        weights: tuple[float, ...] | None = None,
    ):
        if per_step % micro_batch:
            raise ValueError(f"micro-batch {micro_batch} does not divide the {per_step} items of a step")
        self.args = (n_examples, seed, random_flip, caption_dropout, weights)
        self.per_step, self.micro_batch = per_step, micro_batch
        self.start_step, self.rank, self.world = start_step, rank, world

    def step_items(self, step: int) -> list[ItemKey]:
        """This process's items of optimiser step ``step``."""
        first = (step * self.world + self.rank) * self.per_step
        return [plan_item(k, *self.args) for k in range(first, first + self.per_step)]

    def __iter__(self):
        step = self.start_step
        while True:
            items = self.step_items(step)
            for lo in range(0, self.per_step, self.micro_batch):
                yield items[lo : lo + self.micro_batch]
            step += 1


def item_caption(text: str, key: ItemKey, seed: int, tag_dropout: float) -> str:
    """The caption one item of the stream trains on: empty when its caption is dropped, else ``text`` with each
    comma-separated part after the first left out with probability ``tag_dropout`` (drawn from seed and item).

    A build_captions.py caption opens with the diagnosis. Kept on every step while the concepts, demographics
    and skin tone come and go, the diagnosis has to carry the condition's look on its own, as a label caption
    does, and the other parts still teach their concepts (kohya-ss sd-scripts calls this
    caption_tag_dropout_rate with keep_tokens=1).
    """
    _, _, drop, item = key
    if drop:
        return ""
    if tag_dropout <= 0:
        return text
    first, *rest = text.split(", ")
    draw = random.Random(f"{seed}:{item}:tags").random
    return ", ".join([first, *(part for part in rest if draw() >= tag_dropout)])


class ImageCaptionDataset(Dataset):
    """Decodes, crops and flips images and tokenizes captions (with each of the family's tokenizers) on every
    step (the uncached path)."""

    def __init__(
        self,
        examples: list[Example],
        tokenizers: list,
        resolution: int,
        center_crop: bool,
        tag_dropout: float = 0.0,
        seed: int = 0,
    ):
        self.examples = examples
        self.tokenizers = tokenizers
        self.resolution = resolution
        self.center_crop = center_crop
        self.tag_dropout, self.seed = tag_dropout, seed

    def __len__(self) -> int:
        return len(self.examples)

    def framed(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixels, the file's (height, width), the crop's (top, left) unflipped and flipped) of one image.

        SDXL is conditioned on the last two (``add_time_ids``), as diffusers' SDXL script records them: the
        size before resizing and the corner in the resized image, which a flip moves to the other side."""
        image = self.examples[index].image
        width, height = image_size(image_file(image))
        # JPEGs decode at a reduced scale keeping 2x the training size a side (about 4x faster on
        # Derm7pt's 768x512 files); the antialiased resize still does the smoothing.
        x, (top, left), resized_width = frame_image(
            open_rgb(image_file(image), draft=2 * self.resolution), self.resolution, self.center_crop
        )
        corners = torch.tensor([[top, left], [top, resized_width - self.resolution - left]])
        return x, torch.tensor([height, width]), corners

    def __getitem__(self, key: ItemKey) -> dict:
        index, flip, _, item = key
        x, original_size, corners = self.framed(index)
        text = item_caption(self.examples[index].text, key, self.seed, self.tag_dropout)
        ids = {k: v[0] for k, v in tokenize(self.tokenizers, [text]).items()}
        return {
            "pixel_values": torch.flip(x, dims=[-1]) if flip else x,
            **ids,
            "original_size": original_size,
            "crop_top_left": corners[int(flip)],
            "item": torch.tensor(item),
        }


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def make_loader(dataset: Dataset, sampler: PlannedBatches, num_workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
