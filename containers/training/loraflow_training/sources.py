"""Where a step's latents and caption text come from: computed once before the loop, or per step.

Latents are cached when the memory plan says so (with flipped copies under `flip_aug`), stacked per
bucket so a batch is one gather. Text embeddings are cached once per distinct caption when the text
encoders are frozen and captions never change; otherwise captions are tokenized per step (token ids
cached when captions are fixed) and encoded inside the trained network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from loraflow_diffusion.families import ModelFamily, Size, TextEmbeddings

from loraflow_training.data import TrainingData
from loraflow_training.network import TextInput

ENCODE_CHUNK = 8  # images (or captions) per encoder forward: bounds memory, not speed


def to_device(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host data to the device without stalling the GPU queue (pinned memory, non-blocking copy)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.long)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Shard:
    """This process's part of a batch, with the random draws the whole batch made on the host."""

    indices: list[int]
    on_device: torch.Tensor  # `indices` as a device tensor
    bucket: Size  # (width, height) of every sample in the batch
    flips: list[bool] | None  # `flip_aug`: which samples to mirror
    captions: list[str] | None  # captions as this step sees them, when they vary per step


class LatentSource(Protocol):
    def batch(self, shard: Shard) -> torch.Tensor: ...


class TextSource(Protocol):
    def batch(self, shard: Shard) -> TextInput: ...


class CachedLatents:
    """Every sample's latents (and flipped latents), encoded once, stacked per bucket on the device."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        family: ModelFamily,
        data: TrainingData,
        flip_aug: bool,
        generator: torch.Generator,
    ) -> None:
        device = family.denoiser(pipe).device
        self.stacks: dict[Size, torch.Tensor] = {}
        self.flipped: dict[Size, torch.Tensor] = {}
        rows = [0] * len(data.samples)
        for bucket, members in _by_bucket(data).items():
            for row, index in enumerate(members):
                rows[index] = row
            self.stacks[bucket] = _encode_all(pipe, family, data, members, False, generator).to(device)
            if flip_aug:
                self.flipped[bucket] = _encode_all(pipe, family, data, members, True, generator).to(device)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)

    def batch(self, shard: Shard) -> torch.Tensor:
        rows = self.rows[shard.on_device]
        latents = self.stacks[shard.bucket][rows]
        if not shard.flips or not any(shard.flips):
            return latents
        flip = to_device(torch.tensor(shard.flips), rows.device)
        return torch.where(flip[:, None, None, None], self.flipped[shard.bucket][rows], latents)


class EncodedLatents:
    """Latents encoded every step (when caching them would not fit): the VAE stays on the device."""

    def __init__(
        self, pipe: DiffusionPipeline, family: ModelFamily, data: TrainingData, generator: torch.Generator
    ) -> None:
        self.pipe, self.family, self.data, self.generator = pipe, family, data, generator

    def batch(self, shard: Shard) -> torch.Tensor:
        flips = shard.flips or [False] * len(shard.indices)
        pixels = torch.stack([self.data.pixels(i, flip=f) for i, f in zip(shard.indices, flips, strict=True)])
        return self.family.encode_latents(self.pipe, pixels, self.generator)


class CachedEmbeddings:
    """Text embeddings of each distinct caption, encoded once (frozen encoders, fixed captions)."""

    def __init__(
        self, pipe: DiffusionPipeline, family: ModelFamily, data: TrainingData, clip_skip: int | None
    ) -> None:
        device = family.denoiser(pipe).device
        captions = [sample.caption for sample in data.samples]
        distinct = sorted(set(captions))
        parts = []
        encoders = family.text_encoders(pipe)
        for start in range(0, len(distinct), ENCODE_CHUNK):
            ids = [t.to(device) for t in family.tokenize(pipe, distinct[start : start + ENCODE_CHUNK])]
            with torch.no_grad():
                parts.append(family.encode_tokens(encoders, ids, clip_skip))
        self.embeddings = TextEmbeddings.concatenated(parts)
        position = {caption: index for index, caption in enumerate(distinct)}
        self.caption_rows = torch.tensor([position[c] for c in captions], dtype=torch.long, device=device)

    def batch(self, shard: Shard) -> TextInput:
        return self.embeddings.select(self.caption_rows[shard.on_device])


class CachedTokens:
    """Token ids of each sample's (fixed) caption, on the device: the encoders run in the step."""

    def __init__(self, pipe: DiffusionPipeline, family: ModelFamily, data: TrainingData) -> None:
        device = family.denoiser(pipe).device
        self.ids = [t.to(device) for t in family.tokenize(pipe, [s.caption for s in data.samples])]

    def batch(self, shard: Shard) -> TextInput:
        return [ids[shard.on_device] for ids in self.ids]


class StepCaptions:
    """Captions drawn per step (shuffle, dropout), tokenized on the host and encoded in the step."""

    def __init__(self, pipe: DiffusionPipeline, family: ModelFamily) -> None:
        self.pipe, self.family = pipe, family
        self.device = family.denoiser(pipe).device

    def batch(self, shard: Shard) -> TextInput:
        if shard.captions is None:
            raise ValueError("per-step captions were not drawn for this batch")
        return [to_device(ids, self.device) for ids in self.family.tokenize(self.pipe, shard.captions)]


def text_source(
    pipe: DiffusionPipeline, family: ModelFamily, data: TrainingData, train_text: bool, clip_skip: int | None
) -> TextSource:
    if data.captions_vary:
        return StepCaptions(pipe, family)
    if train_text:
        return CachedTokens(pipe, family, data)
    return CachedEmbeddings(pipe, family, data, clip_skip)


def _by_bucket(data: TrainingData) -> dict[Size, list[int]]:
    members: dict[Size, list[int]] = {}
    for index, sample in enumerate(data.samples):
        members.setdefault(sample.bucket, []).append(index)
    return members


def _encode_all(
    pipe: DiffusionPipeline,
    family: ModelFamily,
    data: TrainingData,
    indices: list[int],
    flip: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    chunks = []
    for start in range(0, len(indices), ENCODE_CHUNK):
        pixels = torch.stack([data.pixels(i, flip=flip) for i in indices[start : start + ENCODE_CHUNK]])
        chunks.append(family.encode_latents(pipe, pixels, generator))
    return torch.cat(chunks)
