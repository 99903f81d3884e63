"""A batch's random draws for the objective: the noise and the timesteps (or flow times)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseDraw:
    noise: torch.Tensor
    timesteps: torch.Tensor  # DDPM: integer timesteps; flow matching: t in [0, 1]

    def rows(self, rows: slice | list[int]) -> NoiseDraw:
        """The draws of some rows (a list repeats rows: a padded batch)."""
        if isinstance(rows, list):
            index = torch.tensor(rows, device=self.noise.device)
            return NoiseDraw(self.noise[index], self.timesteps[index])
        return NoiseDraw(self.noise[rows], self.timesteps[rows])
