"""The LoRA training loop (after diffusers' train_dreambooth_lora.py, minus what one GPU does not need).

Latents and text embeddings are computed once before the loop, so a step is only: pick a batch,
add noise, predict it, step the optimizer. Model-family differences go through `ModelFamily`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import cast_training_params
from loraflow_diffusion.families import Conditioning, ModelFamily
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode, LoraflowError
from peft import LoraConfig

from loraflow_training.data import to_model_range

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
LOG_EVERY = 10
_ENCODE_CHUNK = 8  # images (or captions) per encoder forward: bounds memory, not speed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingOutcome:
    steps: int
    final_loss: float  # mean loss over the last logging interval


def train_lora(
    pipe: DiffusionPipeline,
    family: ModelFamily,
    pixels: torch.Tensor,
    captions: Sequence[str],
    epoch: Sequence[int],
    config: TrainingConfig,
) -> TrainingOutcome:
    """Train a LoRA on `pipe.unet` in place. `pixels`: uint8 [N,3,H,W]; `epoch`: sample indices per epoch."""
    seed_everything(config.seed)
    device = pipe.device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    with torch.no_grad():
        latents = encode_latents(pipe, pixels, generator)
        conditioning = encode_captions(pipe, family, captions, config.resolution)
    _offload_frozen_encoders(pipe)
    add_lora(pipe, config)
    batches = shuffled_batches(
        epoch, config.train_batch_size or 1, generator=torch.Generator().manual_seed(config.seed)
    )
    return _run_steps(pipe, family, latents, conditioning, batches, config, generator)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA; the LoRA's gaussian init draws from it


def encode_latents(pipe: DiffusionPipeline, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    vae = pipe.vae
    # SDXL's VAE overflows in fp16 (its config says so): encode in fp32 then.
    encode_dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else vae.dtype
    if vae.dtype != encode_dtype:
        vae.to(dtype=encode_dtype)
    chunks = []
    for start in range(0, len(pixels), _ENCODE_CHUNK):
        images = to_model_range(pixels[start : start + _ENCODE_CHUNK]).to(pipe.device, encode_dtype)
        chunks.append(vae.encode(images).latent_dist.sample(generator=generator))
    return torch.cat(chunks).float() * vae.config.scaling_factor


def encode_captions(
    pipe: DiffusionPipeline, family: ModelFamily, captions: Sequence[str], resolution: tuple[int, int]
) -> Conditioning:
    parts = [
        family.encode_prompts(pipe, captions[start : start + _ENCODE_CHUNK], resolution)
        for start in range(0, len(captions), _ENCODE_CHUNK)
    ]
    return Conditioning(
        torch.cat([part.encoder_hidden_states for part in parts]),
        {
            name: torch.cat([part.added_cond_kwargs[name] for part in parts])
            for name in parts[0].added_cond_kwargs
        },
    )


def _offload_frozen_encoders(pipe: DiffusionPipeline) -> None:
    """Everything was encoded once: the VAE and text encoders can leave the GPU for the UNet's sake."""
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("cpu")


def add_lora(pipe: DiffusionPipeline, config: TrainingConfig) -> None:
    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=config.network_dim,
            # kohya's alpha may be fractional; peft annotates int but only ever computes alpha / r.
            lora_alpha=config.network_alpha,  # type: ignore[arg-type]
            init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
        )
    )
    # Frozen weights may be half precision; the trained LoRA weights stay fp32 (autocast does the rest).
    cast_training_params(unet, dtype=torch.float32)


def shuffled_batches(
    epoch: Sequence[int], batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless batches of sample indices: each epoch reshuffled, the last batch of an epoch may be short."""
    indices = torch.tensor(list(epoch), dtype=torch.long)
    while True:
        shuffled = indices[torch.randperm(len(indices), generator=generator)]
        yield from shuffled.split(batch_size)


def _run_steps(
    pipe: DiffusionPipeline,
    family: ModelFamily,
    latents: torch.Tensor,
    conditioning: Conditioning,
    batches: Iterator[torch.Tensor],
    config: TrainingConfig,
    generator: torch.Generator,
) -> TrainingOutcome:
    unet = pipe.unet
    device = unet.device  # not pipe.device: the encoders were moved off to the CPU
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    scheduler = noise_scheduler_for(pipe)
    half = unet.dtype if unet.dtype in (torch.float16, torch.bfloat16) else None
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)
    interval_loss = torch.zeros((), device=device)
    interval_start, final_loss = 1, float("nan")
    for step in range(1, config.max_train_steps + 1):
        batch = next(batches).to(device)
        with torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
            loss = _denoising_loss(
                unet, family, scheduler, latents[batch], conditioning.select(batch), generator
            )
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        interval_loss += loss.detach()
        if step % LOG_EVERY == 0 or step == config.max_train_steps:
            final_loss = (interval_loss / (step - interval_start + 1)).item()  # the only host sync
            _check_finite(final_loss, step)
            print(f"step={step} loss={final_loss:.6f}", flush=True)  # parsed by the job's MetricDefinitions
            interval_loss.zero_()
            interval_start = step + 1
    return TrainingOutcome(steps=config.max_train_steps, final_loss=final_loss)


def _denoising_loss(
    unet: torch.nn.Module,
    family: ModelFamily,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    generator: torch.Generator,
) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    high = scheduler.config["num_train_timesteps"]
    # diffusers annotates timesteps as IntTensor; any integer tensor works (its own scripts pass int64).
    timesteps = cast(
        torch.IntTensor, torch.randint(0, high, (len(latents),), generator=generator, device=latents.device)
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = family.predict(unet, noisy, timesteps, cond)
    if scheduler.config["prediction_type"] == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())


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


def _check_finite(loss: float, step: int) -> None:
    if not np.isfinite(loss):
        raise LoraflowError(
            ErrorCode.TRAINING_FAILED,
            f"loss became {loss} by step {step}: training diverged (try a lower learning_rate)",
        )
