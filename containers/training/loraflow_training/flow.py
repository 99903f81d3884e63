"""Flow-matching training (FLUX, Qwen-Image, Z-Image): the rectified-flow objective and its time sampling.

x_t = (1 - t) x + t noise; the denoiser predicts the velocity noise - x (sd-scripts' `model_prediction_type
= "raw"`, diffusers' `train_dreambooth_lora_flux.py`). How t is drawn follows sd-scripts'
`timestep_sampling` (library/flux_train_utils.py `get_noisy_model_input_and_timesteps`):

- "uniform": t ~ U(0, 1);
- "sigmoid": t = sigmoid(sigmoid_scale * n), n ~ N(0, 1) (more mass in the middle);
- "shift": the sigmoid draw, then t' = shift * t / (1 + (shift - 1) * t) (more mass at high noise);
- "flux_shift": the sigmoid draw shifted by FLUX's resolution rule: mu grows linearly with the number of
  image tokens (256 → 0.5, 4096 → 1.15), t' = e^mu / (e^mu + 1/t - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from loraflow_diffusion.families import FlowMatchingObjective
from loraflow_shared.dataset.config import TimestepSampling, TrainingConfig

from loraflow_training.noise import NoiseDraw, offset_noise, per_sample_mse, weighted_mean

# FLUX's resolution-dependent shift (its scheduler config: base_image_seq_len, max_image_seq_len,
# base_shift, max_shift).
_BASE_TOKENS, _MAX_TOKENS, _BASE_SHIFT, _MAX_SHIFT = 256, 4096, 0.5, 1.15


@dataclass(frozen=True)
class FlowSampling:
    method: TimestepSampling
    shift: float
    sigmoid_scale: float

    @classmethod
    def from_config(cls, spec: FlowMatchingObjective, config: TrainingConfig) -> FlowSampling:
        """The config's choices (sd-scripts' keys), else the family's defaults."""
        return cls(
            method=config.timestep_sampling or spec.timestep_sampling,
            shift=config.discrete_flow_shift or spec.discrete_flow_shift,
            sigmoid_scale=config.sigmoid_scale or spec.sigmoid_scale,
        )

    def draw(self, batch: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
        """`batch` flow times in [0, 1] for images of `image_tokens` tokens (packed latent patches)."""
        device = generator.device
        if self.method == "uniform":
            return torch.rand((batch,), generator=generator, device=device)
        t = torch.sigmoid(self.sigmoid_scale * torch.randn((batch,), generator=generator, device=device))
        if self.method == "shift":
            return self.shift * t / (1 + (self.shift - 1) * t)
        if self.method == "flux_shift":
            slope = (_MAX_SHIFT - _BASE_SHIFT) / (_MAX_TOKENS - _BASE_TOKENS)
            mu = _BASE_SHIFT + slope * (image_tokens - _BASE_TOKENS)
            return math.exp(mu) / (math.exp(mu) + (1 / t.clamp_min(1e-6) - 1))
        return t


class FlowMatching:
    def __init__(self, sampling: FlowSampling, timestep_scale: float, noise_offset: float | None) -> None:
        self.sampling = sampling
        self.timestep_scale = timestep_scale
        self.noise_offset = noise_offset or 0.0

    def draw(self, shape: torch.Size, generator: torch.Generator) -> NoiseDraw:
        """Noise and flow times for a batch of latents `[N, C, H, W]`, from `generator` (on its device)."""
        noise = offset_noise(shape, generator, self.noise_offset)
        image_tokens = (shape[2] // 2) * (shape[3] // 2)  # 2x2 latent patches, as the DiTs pack them
        return NoiseDraw(noise, self.sampling.draw(shape[0], image_tokens, generator))

    def noisy_latents(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        t = draw.timesteps.view(-1, 1, 1, 1).to(latents.dtype)
        return (1 - t) * latents + t * draw.noise.to(latents.dtype)

    def model_timesteps(self, draw: NoiseDraw) -> torch.Tensor:
        return draw.timesteps * self.timestep_scale

    def target(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        return draw.noise.to(latents.dtype) - latents

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the batch of each sample's MSE, times its prior-loss weight."""
        return weighted_mean(per_sample_mse(prediction, target), sample_weights)
