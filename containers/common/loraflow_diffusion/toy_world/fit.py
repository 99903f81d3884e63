"""Fit the toy world's base model and write it to `toy_world/weights/` (`make toy-base`; ~35 min on 2 CPU
cores). Settings and the measured quality: README.md beside this file; `quality.json` in the weights.

1. The VAE learns to encode every toy-world shape (the new one too: a VAE is a general image codec, as
   SD's is); its latents are scaled to unit variance (SD's `scaling_factor`).
2. The UNet and the text encoder learn to denoise those latents given captions, with 10% of captions
   dropped (classifier-free guidance); an exponential moving average of their weights is what is saved.
   First with SD 1.5's schedule and epsilon prediction (Min-SNR weighting), then moved to the base's own
   schedule, zero terminal SNR with v-prediction, which is what makes it place shapes where the caption
   says (`ZERO_SNR_STAGE`). They never see `NEW_SHAPE`, and never see the held-out
   (colour, shape, position) combinations, on which the base's prompt following is measured.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import compute_snr
from PIL import Image

from loraflow_diffusion.families import family_of
from loraflow_diffusion.toy_world.base import WEIGHTS_DIR, untrained_pipeline
from loraflow_diffusion.toy_world.evaluate import prompt_following
from loraflow_diffusion.toy_world.world import (
    BASE_SHAPES,
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    all_scenes,
    draw_jittered,
)

SEED = 0
LOG_VARIANCE = -14.0  # the VAE posterior's, once fitted: std 1e-3
VAE_STEPS, VAE_BATCH, VAE_LR, KL_WEIGHT = 600, 32, 2e-3, 1e-6
VAE_WARMUP_STEPS, DENOISER_BATCH, CAPTION_DROPOUT, MIN_SNR_GAMMA = 100, 64, 0.1, 5.0
JITTERED_COPIES = 4  # drawings per training scene, each moved by up to JITTER px
PROBE_EVERY = 200
HELD_OUT_COUNT = 6  # (colour, shape, position) combinations the base never sees


def held_out() -> set[tuple[str, str, str]]:
    combos = list(itertools.product(COLOURS, BASE_SHAPES, POSITIONS))
    picked = np.random.default_rng(1234).choice(len(combos), HELD_OUT_COUNT, replace=False)
    return {combos[int(i)] for i in picked}


def is_held_out(scene: Scene) -> bool:
    return (scene.colour, scene.shape, scene.position) in held_out()


def training_scenes() -> list[Scene]:
    return [scene for scene in all_scenes() if not is_held_out(scene)]


def held_out_scenes() -> list[Scene]:
    return [scene for scene in all_scenes() if is_held_out(scene)]


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """`[N, 3, H, W]` in [-1, 1], as SD's VAE takes images."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(arrays / 127.5 - 1.0).permute(0, 3, 1, 2)


def fit_vae(pipe: StableDiffusionPipeline, rng: np.random.Generator, steps: int) -> None:
    vae, scenes = pipe.vae, list(all_scenes(SHAPES))
    optimiser = torch.optim.AdamW(vae.parameters(), lr=VAE_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _cosine(steps))
    started = time.monotonic()
    for step in range(steps):
        batch = to_pixels(
            [draw_jittered(scenes[int(i)], rng) for i in rng.integers(0, len(scenes), VAE_BATCH)]
        )
        posterior = vae.encode(batch).latent_dist
        loss = (vae.decode(posterior.sample()).sample - batch).pow(
            2
        ).mean() + KL_WEIGHT * posterior.kl().mean()
        loss.backward()
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        _progress("vae", step, steps, loss.item(), started)
    with torch.no_grad():
        images = [draw_jittered(scene, rng) for scene in scenes]
        means = torch.cat([vae.encode(to_pixels(chunk)).latent_dist.mean for chunk in _chunks(images, 64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    make_posterior_deterministic(vae)


def make_posterior_deterministic(vae: AutoencoderKL) -> None:
    """Posterior std 1e-3, as SD's VAE is near-deterministic: trainers (ours, diffusers', kohya's) encode
    with `latent_dist.sample()`. The fit leaves it at about 0.6 against latents spread 0.9 (its KL weight
    is tiny), so a LoRA trained on those samples learned noise: its loss on its own training images was
    1.34-1.38x the base's. The means, which the UNet is fitted on, do not change."""
    channels = int(vae.config["latent_channels"])
    moments = vae.quant_conv  # means then log-variances, `2 * channels` outputs
    assert moments is not None, "an SD-shaped VAE has its quant_conv"
    with torch.no_grad():
        moments.weight[channels:] = 0.0
        cast(torch.Tensor, moments.bias)[channels:] = LOG_VARIANCE


@dataclass(frozen=True)
class DenoiserStage:
    """One stage of the denoiser's fit: the noise schedule and prediction it fits, and how."""

    name: str
    steps: int
    lr: float
    text_lr: float
    warmup: int
    ema_decay: float
    schedule: dict[str, Any]  # scheduler config overrides; {} is the base's own (what it renders with)
    cosine: bool  # cosine decay after the warm-up, else constant
    noisiest_share: float  # of each batch, drawn from the noisiest tenth of timesteps


# SD 1.5's schedule and epsilon prediction, from scratch.
SD15_SCHEDULE = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
EPSILON_STAGE = DenoiserStage(
    "denoiser", 2400, 1.5e-3, 5e-4, 100, 0.999, SD15_SCHEDULE, cosine=True, noisiest_share=0.0
)  # fmt: skip
# Then the base's own: zero terminal SNR, v-prediction (Lin et al. 2024, as SD 2.1 was moved). With SD
# 1.5's schedule the noisiest training input keeps 6.8% of the image, whose blurred layout then decides
# where the shape goes (the same seeds put it in the same places for every position word: position 0.15
# held out); with no signal left at the last timestep only the caption can say where (1.0 by step 400).
ZERO_SNR_STAGE = DenoiserStage(
    "zero-snr", 600, 5e-4, 5e-4 / 3, 50, 0.995, {}, cosine=False, noisiest_share=0.25
)  # fmt: skip
STAGES = (EPSILON_STAGE, ZERO_SNR_STAGE)


def fit_denoiser(
    pipe: StableDiffusionPipeline, rng: np.random.Generator, stages: Sequence[DenoiserStage]
) -> StableDiffusionPipeline:
    """Fit UNet and text encoder stage by stage; return a copy of the pipeline holding their moving
    averages (each stage starts from the last one's)."""
    scenes = [scene for scene in training_scenes() for _ in range(JITTERED_COPIES)]
    with torch.no_grad():
        pixels = [to_pixels([draw_jittered(scene, rng) for scene in chunk]) for chunk in _chunks(scenes, 64)]
        scale = pipe.vae.config.scaling_factor
        latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mean * scale for chunk in pixels])
    data = Captioned(latents, _token_ids(pipe, [scene.caption() for scene in scenes]), _token_ids(pipe, [""]))
    for stage in stages:
        pipe = _fit_stage(pipe, data, rng, stage)
    return pipe


@dataclass(frozen=True)
class Captioned:
    latents: torch.Tensor
    ids: torch.Tensor  # each latent's caption, tokenized
    empty: torch.Tensor  # the empty caption, for the dropped ones


def _fit_stage(
    pipe: StableDiffusionPipeline, data: Captioned, rng: np.random.Generator, stage: DenoiserStage
) -> StableDiffusionPipeline:
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, **stage.schedule)
    weights = _loss_weights(noise_scheduler)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    averaged = copy.deepcopy(pipe)
    optimiser = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": stage.lr},
            {"params": list(text_encoder.parameters()), "lr": stage.text_lr},
        ],
        weight_decay=1e-2,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _learning_rate_factor(stage))
    generator, started = torch.Generator().manual_seed(SEED), time.monotonic()
    noisiest = int(DENOISER_BATCH * stage.noisiest_share)
    for step in range(stage.steps):
        index = torch.from_numpy(rng.integers(0, len(data.latents), DENOISER_BATCH))
        batch_ids = data.ids[index].clone()
        dropped = torch.from_numpy(rng.random(DENOISER_BATCH) < CAPTION_DROPOUT)
        batch_ids[dropped] = data.empty
        clean = data.latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, len(weights), (DENOISER_BATCH,), generator=generator)
        timesteps[:noisiest] = torch.randint(
            len(weights) * 9 // 10, len(weights), (noisiest,), generator=generator
        )
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        hidden = text_encoder(batch_ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        target = _target(noise_scheduler, clean, noise, timesteps)
        loss = ((prediction - target).pow(2).mean(dim=(1, 2, 3)) * weights[timesteps]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        _update_average(averaged.unet, unet, step, stage.ema_decay)
        _update_average(averaged.text_encoder, text_encoder, step, stage.ema_decay)
        _progress(stage.name, step, stage.steps, loss.item(), started)
        if (step + 1) % PROBE_EVERY == 0:
            _probe(averaged, stage)
    return averaged


def _loss_weights(scheduler: DDPMScheduler) -> torch.Tensor:
    """Per timestep. Epsilon: Min-SNR-5 (min(SNR, 5) / SNR). v-prediction: the x0 error weighted
    min(SNR + 1, 6), which is the v error's weight min(SNR + 1, 6) / (SNR + 1): 1 up to SNR 5, so the
    noisiest steps, where the layout is decided, count fully (Min-SNR's v weight min(SNR, 5) / (SNR + 1)
    would give the last one, SNR 0, nothing)."""
    snr = compute_snr(scheduler, torch.arange(int(scheduler.config["num_train_timesteps"])))
    if scheduler.config["prediction_type"] == "v_prediction":
        return torch.clamp(snr + 1, max=MIN_SNR_GAMMA + 1) / (snr + 1)
    return torch.clamp(snr, max=MIN_SNR_GAMMA) / snr


def _target(
    scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    if scheduler.config["prediction_type"] == "v_prediction":
        return scheduler.get_velocity(clean, noise, cast(torch.IntTensor, timesteps))
    return noise


def _probe(pipe: StableDiffusionPipeline, stage: DenoiserStage) -> None:
    """Prompt following so far, on half the held-out captions (quick renders): for watching a long fit.
    Rendered with the stage's schedule, which the pipeline's scheduler then renders with too."""
    probed = copy.copy(pipe)  # a shallow copy: the same models, its own scheduler
    probed.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **stage.schedule)
    probed.set_progress_bar_config(disable=True)
    with torch.random.fork_rng(devices=[]):
        rates = prompt_following(probed, held_out_scenes()[::2], seeds=(0, 1))
    print(f"  probe: {rates}", flush=True)


def _token_ids(pipe: StableDiffusionPipeline, prompts: Sequence[str]) -> torch.Tensor:
    [ids] = family_of(pipe).tokenize(pipe, prompts)  # padded and truncated as the pipeline does
    return ids


def _update_average(average: torch.nn.Module, model: torch.nn.Module, step: int, most: float) -> None:
    decay = min(most, (1 + step) / (10 + step))  # warm start, as diffusers' EMAModel
    with torch.no_grad():
        for kept, new in zip(average.parameters(), model.parameters(), strict=True):
            kept.lerp_(new, 1 - decay)


def _cosine(steps: int, warmup: int = VAE_WARMUP_STEPS) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 0: the factor on the learning rate at each step."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def _learning_rate_factor(stage: DenoiserStage) -> Callable[[int], float]:
    if stage.cosine:
        return _cosine(stage.steps, stage.warmup)
    return lambda step: min(1.0, (step + 1) / stage.warmup)


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _progress(stage: str, step: int, steps: int, loss: float, started: float) -> None:
    if step % 100 == 0 or step == steps - 1:
        print(f"{stage} {step + 1}/{steps} loss {loss:.4f} {time.monotonic() - started:.0f}s", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the steps (a quick trial)")
    args = parser.parse_args(argv)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    pipe = untrained_pipeline(SEED)
    pipe.set_progress_bar_config(disable=True)
    fit_vae(pipe, rng, max(1, int(VAE_STEPS * args.scale)))
    stages = [replace(stage, steps=max(1, int(stage.steps * args.scale))) for stage in STAGES]
    fitted = fit_denoiser(pipe, rng, stages)
    fitted.set_progress_bar_config(disable=True)
    quality = {
        "held_out": prompt_following(fitted, held_out_scenes(), seeds=(0, 1)),
        "seen": prompt_following(fitted, training_scenes()[::4], seeds=(0,)),
    }
    print(json.dumps(quality, indent=2))
    fitted.to(torch.float16).save_pretrained(args.out)
    (args.out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
