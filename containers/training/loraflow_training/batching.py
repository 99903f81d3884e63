"""A run's random streams and batch order: the same in every data-parallel process, and the same
again after a resume (the order is replayed from its seed; the random streams are checkpointed)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import TypeVar

import torch
from accelerate import Accelerator

from loraflow_training.data import TrainingData

T = TypeVar("T")


@dataclass
class RandomStreams:
    """The run's random draws, each from its own stream so a resumed run draws the same numbers."""

    host: random.Random  # flips and caption shuffle/dropout
    noise: torch.Generator  # on the device: noise, timesteps, VAE posterior samples

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> RandomStreams:
        return cls(random.Random(seed), torch.Generator(device=device).manual_seed(seed))

    def state(self) -> dict[str, torch.Tensor]:
        version, internal, gauss = self.host.getstate()
        return {
            "host": torch.tensor([version, *internal], dtype=torch.int64),
            "host_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
            "noise": self.noise.get_state(),
        }

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        version, *internal = state["host"].tolist()
        gauss = state["host_gauss"].tolist()
        self.host.setstate((version, tuple(internal), gauss[0] if gauss else None))
        self.noise.set_state(state["noise"])


@dataclass(frozen=True)
class GlobalBatch:
    indices: list[int]  # the batch all processes drew
    rows: slice | list[int]  # this process's positions in it

    def pick(self, values: list[T]) -> list[T]:
        if isinstance(self.rows, slice):
            return values[self.rows]
        return [values[row] for row in self.rows]


class BatchStream:
    """The batch order: one global batch per micro-step, the same in every process (seeded)."""

    def __init__(self, data: TrainingData, batch_size: int, accelerator: Accelerator, seed: int) -> None:
        self.data = data
        self.processes = accelerator.num_processes
        self.rank = accelerator.process_index
        self._batches = data.batches(batch_size * self.processes, torch.Generator().manual_seed(seed))
        self.drawn = 0
        self.images_per_bucket: Counter[str] = Counter()

    def next(self) -> GlobalBatch:
        indices = list(next(self._batches))
        self.drawn += 1
        width, height = self.data.samples[indices[0]].bucket
        self.images_per_bucket[f"{width}x{height}"] += len(indices)
        per_process = -(-len(indices) // self.processes)
        first = self.rank * per_process
        if first + per_process <= len(indices):
            return GlobalBatch(indices, slice(first, first + per_process))
        # A short batch: the last processes repeat its samples so that every process trains on as many
        # rows (accelerate's `even_batches` does the same). Random draws stay those of the real batch.
        return GlobalBatch(indices, [(first + i) % len(indices) for i in range(per_process)])

    def skip(self, count: int) -> None:
        """Replay `count` batches (a resumed run continues the same order; counting images again)."""
        for _ in range(count):
            self.next()
