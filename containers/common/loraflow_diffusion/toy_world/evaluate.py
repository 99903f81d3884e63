"""What a toy-world pipeline draws for captions, read back by `judge`: how well a base follows prompts,
and how often a LoRA draws its subject with and without its trigger word."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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
    pipe: StableDiffusionPipeline,
    scenes: Sequence[Scene],
    seeds: Iterable[int],
    shape_word: str | None = None,
) -> dict[str, float]:
    """The share of renders whose colour, shape and position (each, and all three) match the caption;
    `shape_word` names the shapes in the captions instead (a LoRA's trigger for its new shape)."""
    seeds = list(seeds)
    read_back = readings(pipe, [scene.caption(shape_word) for scene in scenes], seeds)
    return _following(read_back, [scene for _ in seeds for scene in scenes])


def _following(read_back: Sequence[Reading], expected: Sequence[Scene]) -> dict[str, float]:
    pairs = list(zip(read_back, expected, strict=True))
    rates = {field: _share(reading.agrees(scene, field) for reading, scene in pairs) for field in FIELDS}
    rates["all"] = _share(reading.agrees(scene, *FIELDS) for reading, scene in pairs)
    return rates


@dataclass(frozen=True)
class TriggerRates:
    """What a pipeline draws for a LoRA's trigger and without it, read back: shares of renders."""

    with_trigger: dict[str, float]  # the subject's scenes captioned with the trigger: prompt following
    without_trigger: dict[str, float]  # other scenes' captions: prompt following
    subject_without_trigger: float  # other scenes' captions drawn as the subject's shape


def trigger_rates(
    pipe: StableDiffusionPipeline,
    trigger: str,
    subject_scenes: Sequence[Scene],
    other_scenes: Sequence[Scene],
    seeds: Iterable[int],
) -> TriggerRates:
    """`subject_scenes` show the LoRA's new shape (which `trigger` names); `other_scenes` the base's."""
    seeds = list(seeds)
    [subject_shape] = {scene.shape for scene in subject_scenes}
    others = readings(pipe, [scene.caption() for scene in other_scenes], seeds)
    return TriggerRates(
        with_trigger=prompt_following(pipe, subject_scenes, seeds, shape_word=trigger),
        without_trigger=_following(others, [scene for _ in seeds for scene in other_scenes]),
        subject_without_trigger=_share(reading.shape == subject_shape for reading in others),
    )


def _share(hits: Iterable[bool]) -> float:
    values = list(hits)
    return round(sum(values) / len(values), 3) if values else 0.0
