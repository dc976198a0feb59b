"""Torch datasets for diffusion training from a folder holding ``metadata.jsonl`` (file_name, text).

Each batch is planned from (seed, batch number) alone: which images, which are flipped, which
captions are dropped. So an interrupted run resumes on exactly the batches it would have seen, and
the cached-latent path picks the same flip the image path would have applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from ..errors import InputError
from ..images import decode_problem, open_rgb
from ..tables import read_metadata
from ..tokens import CLIP_MAX_TOKENS


@dataclass(frozen=True)
class Example:
    path: Path
    text: str
    label: str | None
    row: int  # 1-based line in metadata.jsonl, for error messages


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


def read_examples(train_data_dir: str | Path, tokenizer=None, max_tokens: int = CLIP_MAX_TOKENS) -> list[Example]:
    """Read and check every row before training starts: image present and fully decodable, caption within the window."""
    meta = find_metadata(train_data_dir)
    folder = meta.parent
    examples = []
    for i, row in read_metadata(meta):
        where = f"{meta} row {i}"
        if not row.get("file_name") or not isinstance(row.get("text"), str):
            raise InputError(where, "needs a file_name and a text field", "rebuild it with build_captions.py")
        path = folder / row["file_name"]
        if not path.is_file():
            raise InputError(where, f"image {path} not found", "restore the image or remove its row")
        problem = decode_problem(path)
        if problem:
            raise InputError(where, f"image {path} cannot be read ({problem})", "replace the image or remove its row")
        if tokenizer is not None:
            n = len(tokenizer(row["text"], truncation=False, verbose=False).input_ids)
            if n > max_tokens:
                raise InputError(
                    where,
                    f"caption has {n} tokens, more than the text encoder's {max_tokens}",
                    "shorten it (build_captions.py fits captions to the window)",
                )
        examples.append(Example(path, row["text"], row.get("label"), i))
    if not examples:
        raise InputError(meta, "no training examples", "add rows with file_name and text")
    return examples


def image_transform(resolution: int, center_crop: bool) -> transforms.Compose:
    """Resize the short side, crop square, scale to [-1, 1]; flips are applied by the batch plan, not here."""
    crop = transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution)
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            crop,
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@dataclass(frozen=True)
class BatchPlan:
    """What one micro-batch holds, a pure function of (seed, batch number)."""

    indices: list[int]
    flips: list[bool]
    drop_caption: list[bool]


def plan_batch(
    number: int, n_examples: int, batch_size: int, seed: int, random_flip: bool, caption_dropout: float
) -> BatchPlan:
    """Batch ``number`` of an endless shuffled stream: epoch e is a seeded permutation; no state to save."""
    per_epoch = max(n_examples // batch_size, 1)
    epoch, within = divmod(number, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    indices = [order[(within * batch_size + j) % n_examples] for j in range(batch_size)]
    g = torch.Generator().manual_seed(seed * 7_919 + number * 104_729 + 17)
    draws = torch.rand(2, batch_size, generator=g)
    flips = [bool(x) for x in (draws[0] < 0.5)] if random_flip else [False] * batch_size
    drops = [bool(x) for x in (draws[1] < caption_dropout)]
    return BatchPlan(indices, flips, drops)


class PlannedBatches(torch.utils.data.Sampler):
    """Endless batch sampler from ``start``; process ``rank`` of ``world`` takes every world-th batch."""

    def __init__(
        self,
        n_examples: int,
        batch_size: int,
        seed: int,
        random_flip: bool,
        caption_dropout: float,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.args = (n_examples, batch_size, seed, random_flip, caption_dropout)
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self):
        k = self.start
        while True:
            plan = plan_batch(k * self.world + self.rank, *self.args)
            yield list(zip(plan.indices, plan.flips, plan.drop_caption, strict=True))
            k += 1


class ImageCaptionDataset(Dataset):
    """Decodes, crops and flips images and tokenizes captions on every step (the uncached path)."""

    def __init__(self, examples: list[Example], tokenizer, resolution: int, center_crop: bool):
        self.examples = examples
        self.tokenizer = tokenizer
        self.transform = image_transform(resolution, center_crop)

    def __len__(self) -> int:
        return len(self.examples)

    def pixels(self, index: int, flip: bool) -> torch.Tensor:
        x = self.transform(open_rgb(self.examples[index].path))
        return torch.flip(x, dims=[-1]) if flip else x

    def __getitem__(self, key: tuple[int, bool, bool]) -> dict:
        index, flip, drop = key
        text = "" if drop else self.examples[index].text
        return {"pixel_values": self.pixels(index, flip), "input_ids": tokenize(self.tokenizer, [text])[0]}


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def make_loader(dataset: Dataset, sampler: PlannedBatches, num_workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
