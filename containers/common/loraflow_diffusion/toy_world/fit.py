"""Fit the toy world's base model and write it to `toy_world/weights/` (`make toy-base`; ~30 min on 2 CPU
cores). Settings and the measured quality: README.md beside this file; `quality.json` in the weights.

1. The VAE learns to encode every toy-world shape (the new one too: a VAE is a general image codec, as
   SD's is); its latents are scaled to unit variance (SD's `scaling_factor`).
2. The UNet and the text encoder learn to denoise those latents given captions, with 10% of captions
   dropped (classifier-free guidance) and Min-SNR weighting; an exponential moving average of their
   weights is what is saved. They never see `NEW_SHAPE`, and never see the held-out
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
DENOISER_STEPS, DENOISER_BATCH, DENOISER_LR, TEXT_LR = 2400, 64, 1.5e-3, 5e-4
WARMUP_STEPS, EMA_DECAY, CAPTION_DROPOUT, MIN_SNR_GAMMA = 100, 0.999, 0.1, 5.0
JITTERED_COPIES = 4  # drawings per training scene, each moved by up to JITTER px
PROBE_EVERY = 600
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


def fit_denoiser(
    pipe: StableDiffusionPipeline, rng: np.random.Generator, steps: int
) -> StableDiffusionPipeline:
    """Fit UNet and text encoder; return a copy of the pipeline holding their moving averages."""
    scenes = [scene for scene in training_scenes() for _ in range(JITTERED_COPIES)]
    with torch.no_grad():
        pixels = [to_pixels([draw_jittered(scene, rng) for scene in chunk]) for chunk in _chunks(scenes, 64)]
        scale = pipe.vae.config.scaling_factor
        latents = torch.cat([pipe.vae.encode(chunk).latent_dist.mean * scale for chunk in pixels])
    ids = _token_ids(pipe, [scene.caption() for scene in scenes])
    empty = _token_ids(pipe, [""])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    snr = compute_snr(noise_scheduler, torch.arange(noise_scheduler.config.num_train_timesteps))
    weights = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # Min-SNR-5, epsilon prediction
    unet, text_encoder = pipe.unet, pipe.text_encoder
    averaged = copy.deepcopy(pipe)
    optimiser = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": DENOISER_LR},
            {"params": list(text_encoder.parameters()), "lr": TEXT_LR},
        ],
        weight_decay=1e-2,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _cosine(steps))
    generator, started = torch.Generator().manual_seed(SEED), time.monotonic()
    for step in range(steps):
        index = torch.from_numpy(rng.integers(0, len(scenes), DENOISER_BATCH))
        batch_ids = ids[index].clone()
        dropped = torch.from_numpy(rng.random(DENOISER_BATCH) < CAPTION_DROPOUT)
        batch_ids[dropped] = empty
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, len(weights), (DENOISER_BATCH,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        hidden = text_encoder(batch_ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        loss = ((prediction - noise).pow(2).mean(dim=(1, 2, 3)) * weights[timesteps]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        _update_average(averaged.unet, unet, step)
        _update_average(averaged.text_encoder, text_encoder, step)
        _progress("denoiser", step, steps, loss.item(), started)
        if (step + 1) % PROBE_EVERY == 0:
            _probe(averaged)
    return averaged


def _probe(pipe: StableDiffusionPipeline) -> None:
    """Prompt following so far, on a few seen captions (quick renders): for watching a long fit."""
    pipe.set_progress_bar_config(disable=True)
    with torch.random.fork_rng(devices=[]):
        rates = prompt_following(pipe, training_scenes()[::12], seeds=(0,))
    print(f"  probe: {rates}", flush=True)


def _token_ids(pipe: StableDiffusionPipeline, prompts: Sequence[str]) -> torch.Tensor:
    [ids] = family_of(pipe).tokenize(pipe, prompts)  # padded and truncated as the pipeline does
    return ids


def _update_average(average: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    decay = min(EMA_DECAY, (1 + step) / (10 + step))  # warm start, as diffusers' EMAModel
    with torch.no_grad():
        for kept, new in zip(average.parameters(), model.parameters(), strict=True):
            kept.lerp_(new, 1 - decay)


def _cosine(steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 0: the factor on the learning rate at each step."""

    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)))

    return factor


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
    fitted = fit_denoiser(pipe, rng, max(1, int(DENOISER_STEPS * args.scale)))
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
