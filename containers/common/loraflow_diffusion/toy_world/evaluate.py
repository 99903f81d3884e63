"""What a toy-world pipeline draws for captions, read back by `judge`: how well a base follows prompts,
and how often a LoRA draws its subject with and without its trigger word."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from PIL import Image

from loraflow_diffusion.toy_world.judge import Reading, read
from loraflow_diffusion.toy_world.world import Scene

RENDER_STEPS, RENDER_GUIDANCE = 20, 7.5  # as the previews render (SD's default guidance)
FIELDS = ("colour", "shape", "position")
BATCH = 32


@torch.no_grad()
def render(pipe: StableDiffusionPipeline, prompts: Sequence[str], seed: int) -> list[Image.Image]:
    """One picture per prompt; prompt i with seed + i, whatever the batch it is rendered in."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), BATCH):
        chunk = prompts[start : start + BATCH]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        output = pipe(
            list(chunk),
            num_inference_steps=RENDER_STEPS,
            guidance_scale=RENDER_GUIDANCE,
            generator=generators,
        )
        images.extend(output.images)
    return images


def readings(pipe: StableDiffusionPipeline, prompts: Sequence[str], seeds: Iterable[int]) -> list[Reading]:
    return [read(image) for seed in seeds for image in render(pipe, prompts, seed)]


def prompt_following(
    pipe: StableDiffusionPipeline, scenes: Sequence[Scene], seeds: Iterable[int]
) -> dict[str, float]:
    """The share of renders whose colour, shape and position (each, and all three) match the caption."""
    seeds = list(seeds)
    read_back = readings(pipe, [scene.caption() for scene in scenes], seeds)
    expected = [scene for _ in seeds for scene in scenes]
    rates = {
        field: _share(r.agrees(s, field) for r, s in zip(read_back, expected, strict=True))
        for field in FIELDS
    }
    rates["all"] = _share(r.agrees(s, *FIELDS) for r, s in zip(read_back, expected, strict=True))
    return rates


def hit_rate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    subject: Scene,
    seeds: Iterable[int],
    fields: Sequence[str] = ("colour", "shape"),
) -> float:
    """The share of renders of `prompts` that show `subject` (its `fields`)."""
    return _share(reading.agrees(subject, *fields) for reading in readings(pipe, prompts, seeds))


def _share(hits: Iterable[bool]) -> float:
    values = list(hits)
    return round(sum(values) / len(values), 3) if values else 0.0
