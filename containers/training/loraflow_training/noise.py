"""A batch's random draws for the objective: the noise and the timesteps (or flow times)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def offset_noise(shape: torch.Size, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise of `shape` from `generator` (on its device), plus kohya's `noise_offset`: a
    per-channel constant, so the LoRA can learn very dark or bright images."""
    device = generator.device
    noise = torch.randn(shape, generator=generator, device=device)
    if noise_offset:
        offset = torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
        noise = noise + noise_offset * offset
    return noise


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's mean squared error, in fp32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def weighted_mean(per_sample: torch.Tensor, sample_weights: torch.Tensor | None) -> torch.Tensor:
    """The batch's loss: each sample's loss times its prior-loss weight (kohya's reg images), averaged."""
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.mean()
