"""The dataset channel as training samples: one per image, with its caption and subset repeats.

The layout rules (what a subset folder is, which caption belongs to which image) come from
`loraflow_shared.dataset.layout`, the same code that validated the upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from loraflow_shared.dataset.layout import Subset, group_files, parse_subset_folder
from loraflow_shared.errors import ErrorCode, LoraflowError
from PIL import Image, ImageOps


@dataclass(frozen=True)
class Sample:
    image: str  # relative to the dataset root, e.g. "10_dwjz/img00.png"
    caption: str
    subset: Subset


@dataclass(frozen=True)
class TrainingSet:
    samples: list[Sample]

    def epoch(self) -> list[int]:
        """Sample indices of one epoch: each image appears `repeats` times (kohya's folder prefix)."""
        return [index for index, sample in enumerate(self.samples) for _ in range(sample.subset.repeats)]

    def repeats_by_subset(self) -> dict[str, int]:
        return {sample.subset.folder: sample.subset.repeats for sample in self.samples}

    def images_by_subset(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sample in self.samples:
            counts[sample.subset.folder] = counts.get(sample.subset.folder, 0) + 1
        return counts


def scan_dataset(root: Path) -> TrainingSet:
    rel_paths = [path.relative_to(root).as_posix() for path in sorted(root.rglob("*")) if path.is_file()]
    files = group_files(rel_paths)
    samples: list[Sample] = []
    for folder, subset_files in sorted(files.folders.items()):
        subset = parse_subset_folder(folder)
        for image in subset_files.images:
            caption_file = subset_files.caption_for(image)
            caption = _read_caption(root, caption_file) if caption_file else subset.default_caption
            samples.append(Sample(image=image, caption=caption, subset=subset))
    if not samples:
        raise LoraflowError(
            ErrorCode.NO_ASSET_FOLDER, "the dataset channel holds no images in subset folders"
        )
    return TrainingSet(samples)


def _read_caption(root: Path, rel_path: str) -> str:
    try:
        caption = (root / rel_path).read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise LoraflowError(
            ErrorCode.BAD_CAPTION, f"caption is not UTF-8 text: {exc.reason}", rel_path
        ) from exc
    if not caption:
        raise LoraflowError(ErrorCode.BAD_CAPTION, "caption file is empty", rel_path)
    return caption


def load_images(root: Path, samples: Sequence[Sample], size: tuple[int, int]) -> torch.Tensor:
    """All images as uint8 `[N, 3, height, width]`: RGB, shorter side resized, centre-cropped.

    Decoded before the model loads, so a broken image fails the job in seconds, not after minutes.
    """
    return torch.stack([_load_image(root, sample.image, size) for sample in samples])


def _load_image(root: Path, rel_path: str, size: tuple[int, int]) -> torch.Tensor:
    try:
        with Image.open(root / rel_path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")  # decodes fully: truncation shows here
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LoraflowError(ErrorCode.UNREADABLE_IMAGE, f"cannot decode image: {exc}", rel_path) from exc
    fitted = ImageOps.fit(image, size, method=Image.Resampling.BICUBIC)  # size is (width, height)
    return torch.from_numpy(np.asarray(fitted, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to the VAE's float [-1, 1]."""
    return pixels.float() / 127.5 - 1.0
