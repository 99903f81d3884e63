"""The training objective: noise and timesteps to draw, the target to predict, the weighted loss.

Which objective a run trains with is the family's (`ModelFamily.objective`); `build_objective` is the one
place that turns a family's objective specification into the objective. For the DDPM families (SD 1.x/2.x,
SDXL), kohya's options: `noise_offset` (a per-channel constant added to the noise, so the LoRA can learn
very dark or bright images), `min_snr_gamma` (Min-SNR weighting, Hang et al. 2023, with diffusers'
`compute_snr`), and `prior_loss_weight` for regularization images (a per-sample weight).
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import compute_snr
from loraflow_diffusion.families import DdpmObjective, FlowMatchingObjective, ModelFamily
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode, LoraflowError

from loraflow_training.flow import FlowMatching, FlowSampling
from loraflow_training.noise import NoiseDraw, offset_noise, per_sample_mse, weighted_mean

__all__ = ["DenoisingObjective", "NoiseDraw", "Objective", "build_objective", "noise_scheduler_for"]

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


def noise_scheduler_for(pipe: DiffusionPipeline) -> DDPMScheduler:
    """The training scheduler: DDPM with the base model's noise schedule and prediction type."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = scheduler.config["prediction_type"]
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise LoraflowError(
            ErrorCode.TRAINING_FAILED,
            f"the base model predicts {prediction_type!r}; training supports {SUPPORTED_PREDICTION_TYPES}",
        )
    return scheduler


class DenoisingObjective:
    def __init__(
        self,
        scheduler: DDPMScheduler,
        device: torch.device,
        noise_offset: float | None = None,
        min_snr_gamma: float | None = None,
    ) -> None:
        self.scheduler = scheduler
        # Moved once: diffusers would otherwise copy the schedule to the GPU on the first calls.
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        self.num_timesteps = int(scheduler.config["num_train_timesteps"])
        self.v_prediction = scheduler.config["prediction_type"] == "v_prediction"
        self.noise_offset = noise_offset or 0.0
        self.min_snr_gamma = min_snr_gamma
        self._snr = compute_snr(scheduler, torch.arange(self.num_timesteps, device=device))

    def draw(self, shape: torch.Size, generator: torch.Generator) -> NoiseDraw:
        """Noise and timesteps for a batch of latents of `shape`, from `generator` (on its device)."""
        device = generator.device
        noise = offset_noise(shape, generator, self.noise_offset)
        timesteps = torch.randint(0, self.num_timesteps, (shape[0],), generator=generator, device=device)
        return NoiseDraw(noise, timesteps)

    def noisy_latents(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        # diffusers annotates timesteps as IntTensor; any integer tensor works (its own scripts pass int64).
        return self.scheduler.add_noise(latents, draw.noise, cast(torch.IntTensor, draw.timesteps))

    def model_timesteps(self, draw: NoiseDraw) -> torch.Tensor:
        """What the denoiser's `timestep` argument gets: the integer DDPM timestep itself."""
        return draw.timesteps

    def target(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor:
        if self.v_prediction:
            return self.scheduler.get_velocity(latents, draw.noise, cast(torch.IntTensor, draw.timesteps))
        return draw.noise

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over the batch of each sample's MSE, times its Min-SNR and prior-loss weights."""
        per_sample = per_sample_mse(prediction, target)
        if self.min_snr_gamma is not None:
            per_sample = per_sample * self._snr_weights(timesteps)
        return weighted_mean(per_sample, sample_weights)

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction (diffusers and kohya alike)."""
        snr = self._snr[timesteps]
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / (snr + 1) if self.v_prediction else clipped / snr


class Objective(Protocol):
    """What the loop needs of an objective (DDPM noise prediction, flow matching)."""

    def draw(self, shape: torch.Size, generator: torch.Generator) -> NoiseDraw: ...

    def noisy_latents(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor: ...

    def model_timesteps(self, draw: NoiseDraw) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, draw: NoiseDraw) -> torch.Tensor: ...

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def build_objective(
    family: ModelFamily, pipe: DiffusionPipeline, config: TrainingConfig, device: torch.device
) -> Objective:
    """The objective `family` trains with, set up for `pipe` and the config's loss options."""
    spec = family.objective
    if isinstance(spec, DdpmObjective):
        return DenoisingObjective(
            noise_scheduler_for(pipe), device, config.noise_offset, config.min_snr_gamma
        )
    if isinstance(spec, FlowMatchingObjective):
        return FlowMatching(FlowSampling.from_config(spec, config), spec.timestep_scale, config.noise_offset)
    raise TypeError(f"{family.name}: no training objective for {type(spec).__name__}")
