"""The dataset channel as training samples: bucketed images, their captions, repeats and reg balance.

The layout rules (subset folders, `reg/` subsets, which caption belongs to which image, `metadata.jsonl`)
come from `loraflow_shared.dataset`, the same code that validated the upload. Images are opened once
here (size, EXIF orientation, a full decode and conversion so a broken file fails the job before the
model loads); their pixels are decoded again only when `TrainingData.pixels` asks, so memory holds no
image set. `pixels.py` says what every kind of PNG, JPEG and WebP becomes (orientation, 16-bit, palettes,
CMYK, transparency over white, animation).

Where this differs from kohya: images are resized with Pillow's LANCZOS both ways (kohya shrinks with
OpenCV's INTER_AREA), and a JPEG much larger than its bucket is decoded at 1/2-1/8 scale first
(Pillow's `draft`), which is several times faster and within a grey level or so of a full decode.
Shuffles draw from the caller's `torch.Generator` (kohya uses Python's `random`).
"""

from __future__ import annotations

import logging
import math
import random
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loraflow_shared.dataset.captions import caption_texts
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.dataset.layout import (
    FORMAT_EXTENSIONS,
    Subset,
    SubsetFiles,
    group_files,
    parse_subset_folder,
)
from loraflow_shared.errors import ErrorCode, LoraflowError
from PIL import Image

from loraflow_training.buckets import BucketFit, Bucketing
from loraflow_training.captions import CaptionRules
from loraflow_training.pixels import oriented_size, to_training_rgb

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
_PROBE_THREADS = 8  # Pillow decodes without the GIL: a few threads cut the start-up check
_FORMATS = tuple(FORMAT_EXTENSIONS)  # decoded as validation judged them (magic bytes), nothing else

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    rel_path: str  # from the dataset root, e.g. "10_dwjz/img00.png"
    caption: str  # as written (caption file, metadata.jsonl line or folder name)
    subset: str  # the subset folder, e.g. "10_dwjz" or "reg/1_dog"
    is_reg: bool
    bucket: tuple[int, int]  # (width, height) the image trains at


@dataclass(frozen=True)
class _Entry:
    """A sample before its image is opened."""

    rel_path: str
    caption: str
    subset: str
    is_reg: bool
    base_repeats: int


class TrainingData:
    """Samples with their epoch composition, batches by bucket, and per-step pixels and captions."""

    def __init__(
        self,
        root: Path,
        samples: Sequence[Sample],
        fits: Sequence[BucketFit],
        repeats: Sequence[int],
        caption_rules: CaptionRules,
    ) -> None:
        self.root = root
        self.samples = list(samples)
        self.repeats = list(repeats)  # per sample, per epoch (reg samples balanced)
        self._fits = list(fits)
        self._caption_rules = caption_rules
        self.captions_vary = caption_rules.varies(sample.caption for sample in self.samples)
        self.bucket_counts = _bucket_counts(self.samples)

    def epoch_indices(self) -> list[int]:
        """Sample indices of one epoch: each sample appears its `repeats` times, in sample order."""
        return [index for index, count in enumerate(self.repeats) for _ in range(count)]

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
        """Endless batches of sample indices, each from one bucket; every epoch is reshuffled.

        As kohya: per epoch, each bucket's samples are shuffled and cut into batches (its last batch may
        be short), then the order of all batches is shuffled.
        """
        while True:
            yield from self._epoch_batches(batch_size, generator)

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches in one epoch: per bucket, its samples per epoch over the batch size, rounded up."""
        return sum(math.ceil(len(members) / batch_size) for members in self._epoch_by_bucket().values())

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """uint8 `[3, height, width]` at the sample's bucket size; `flip` mirrors it left-right."""
        image = _fitted_image(self.root, self.samples[index].rel_path, self._fits[index])
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(image)

    def caption(self, index: int, rng: random.Random) -> str:
        """The caption one step sees: `shuffle_caption`, `keep_tokens`, `caption_dropout_rate` applied."""
        return self._caption_rules.apply(self.samples[index].caption, rng)

    def images_by_subset(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sample in self.samples:
            counts[sample.subset] = counts.get(sample.subset, 0) + 1
        return counts

    def repeats_by_subset(self) -> dict[str, int]:
        """Samples per epoch of each subset (reg subsets after balancing)."""
        totals: dict[str, int] = {}
        for sample, count in zip(self.samples, self.repeats, strict=True):
            totals[sample.subset] = totals.get(sample.subset, 0) + count
        return totals

    def _epoch_by_bucket(self) -> dict[tuple[int, int], list[int]]:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in self.epoch_indices():
            by_bucket.setdefault(self.samples[index].bucket, []).append(index)
        return dict(sorted(by_bucket.items()))

    def _epoch_batches(self, batch_size: int, generator: torch.Generator) -> list[list[int]]:
        batches: list[list[int]] = []
        for members in self._epoch_by_bucket().values():
            shuffled = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            batches += [shuffled[start : start + batch_size] for start in range(0, len(shuffled), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def load_training_data(dataset_dir: Path, config: TrainingConfig) -> TrainingData:
    """Read the channel: UNREADABLE_IMAGE (with the image's path) when an image does not decode."""
    entries = _entries(dataset_dir)
    repeats = _epoch_repeats(entries)
    used = [(entry, count) for entry, count in zip(entries, repeats, strict=True) if count > 0]
    if len(used) < len(entries):
        unused = len(entries) - len(used)
        logger.warning("%d regularization images unused: there are more than training samples", unused)
    bucketing = Bucketing.from_config(config)
    fits = _probe_all(dataset_dir, [entry.rel_path for entry, _ in used], bucketing)
    samples = [
        Sample(entry.rel_path, entry.caption, entry.subset, entry.is_reg, fit.bucket)
        for (entry, _), fit in zip(used, fits, strict=True)
    ]
    return TrainingData(
        dataset_dir, samples, fits, [count for _, count in used], CaptionRules.from_config(config)
    )


def _entries(root: Path) -> list[_Entry]:
    """Every image of every subset folder with its caption: training subsets first, then reg."""
    rel_paths = [path.relative_to(root).as_posix() for path in sorted(root.rglob("*")) if path.is_file()]
    files = group_files(rel_paths)
    if not files.train_image_count:
        message = "the dataset channel holds no images in training subset folders"
        raise LoraflowError(ErrorCode.NO_ASSET_FOLDER, message)
    folders = sorted(files.train_folders, key=_folder_key) + sorted(files.reg_folders, key=_folder_key)
    return [entry for subset_files in folders for entry in _subset_entries(root, subset_files)]


def _folder_key(files: SubsetFiles) -> str:
    return files.folder


def _subset_entries(root: Path, files: SubsetFiles) -> list[_Entry]:
    subset = parse_subset_folder(files.folder)
    captions = caption_texts(files, subset.default_caption, lambda rel_path: (root / rel_path).read_bytes())
    return [
        _Entry(image, captions[image], subset.folder, subset.is_reg, subset.repeats) for image in files.images
    ]


def _epoch_repeats(entries: Sequence[_Entry]) -> list[int]:
    train_samples = sum(entry.base_repeats for entry in entries if not entry.is_reg)
    reg_base = [entry.base_repeats for entry in entries if entry.is_reg]
    reg_repeats = iter(balanced_reg_repeats(reg_base, train_samples))
    return [next(reg_repeats) if entry.is_reg else entry.base_repeats for entry in entries]


def balanced_reg_repeats(reg_repeats: Sequence[int], train_samples: int) -> list[int]:
    """Per reg image, its samples per epoch: kohya's balancing (`DreamBoothDataset.__init__`).

    Reg images are taken in order with their folder's repeats until they reach `train_samples`
    (the rest get 0: unused); if all are taken and still short, each gets one more repeat in turn.
    As in kohya, the first pass can overshoot `train_samples` when a reg folder's repeats exceed 1.
    """
    result = [0] * len(reg_repeats)
    total, first_pass = 0, True
    while reg_repeats and total < train_samples:
        for index, base in enumerate(reg_repeats):
            added = base if first_pass else 1
            result[index] += added
            total += added
            if total >= train_samples:
                break
        first_pass = False
    return result


def _probe_all(root: Path, rel_paths: Sequence[str], bucketing: Bucketing) -> list[BucketFit]:
    with ThreadPoolExecutor(max_workers=_PROBE_THREADS) as pool:
        return list(pool.map(lambda rel_path: _probe(root, rel_path, bucketing), rel_paths))


def _probe(root: Path, rel_path: str, bucketing: Bucketing) -> BucketFit:
    """The image's bucket (for its upright size), after decoding and converting it whole (at a reduced JPEG
    scale) to prove that works."""
    with _opened(root, rel_path) as image:
        fit = bucketing.fit(*oriented_size(image))
        _draft(image, fit)
        to_training_rgb(image, rel_path)
    return fit


def _fitted_image(root: Path, rel_path: str, fit: BucketFit) -> Image.Image:
    """Decode, orient and convert, resize to cover the bucket, centre-crop (kohya's
    `trim_and_resize_if_required`)."""
    with _opened(root, rel_path) as image:
        _draft(image, fit)
        oriented = to_training_rgb(image, rel_path)
    if oriented.size != fit.resized:
        oriented = oriented.resize(fit.resized, Image.Resampling.LANCZOS)
    return oriented.crop(fit.crop_box()) if oriented.size != fit.bucket else oriented


def _draft(image: Image.Image, fit: BucketFit) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale when that still covers the resized size (either way up)."""
    side = max(fit.resized)
    image.draft("RGB", (side, side))


@contextmanager
def _opened(root: Path, rel_path: str) -> Iterator[Image.Image]:
    try:
        with Image.open(root / rel_path, formats=_FORMATS) as image:
            yield image
    except _DECODE_ERRORS as exc:
        raise LoraflowError(ErrorCode.UNREADABLE_IMAGE, f"cannot decode image: {exc}", rel_path) from exc


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _bucket_counts(samples: Sequence[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in sorted(samples, key=lambda sample: sample.bucket):
        key = f"{sample.bucket[0]}x{sample.bucket[1]}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to the VAE's float [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


# The walking skeleton's API: only its old tests (test_training_entrypoint, test_training_loop) still
# call it. Delete once they use `TrainingData`.
@dataclass(frozen=True)
class LegacySample:
    image: str
    caption: str
    subset: Subset


@dataclass(frozen=True)
class TrainingSet:
    samples: list[LegacySample]

    def epoch(self) -> list[int]:
        return [index for index, sample in enumerate(self.samples) for _ in range(sample.subset.repeats)]

    def repeats_by_subset(self) -> dict[str, int]:
        return {sample.subset.folder: sample.subset.repeats for sample in self.samples}

    def images_by_subset(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sample in self.samples:
            counts[sample.subset.folder] = counts.get(sample.subset.folder, 0) + 1
        return counts


def scan_dataset(root: Path) -> TrainingSet:
    return TrainingSet(
        [
            LegacySample(entry.rel_path, entry.caption, parse_subset_folder(entry.subset))
            for entry in _entries(root)
        ]
    )


def load_images(root: Path, samples: Sequence[LegacySample], size: tuple[int, int]) -> torch.Tensor:
    """All images as uint8 `[N, 3, height, width]`, resized to cover `size` and centre-cropped."""
    bucketing = Bucketing(size)
    fits = _probe_all(root, [sample.image for sample in samples], bucketing)
    return torch.stack(
        [
            _to_tensor(_fitted_image(root, sample.image, fit))
            for sample, fit in zip(samples, fits, strict=True)
        ]
    )
