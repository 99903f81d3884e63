"""The largest seeds a config may hold work in the code that uses them: the trainer's seeding, its random
streams and LoRA-effect renders, and the preview renderer's one generator per prompt (seed + index)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loraflow_diffusion.models import load_pipeline
from loraflow_inference.handler import render_prompts
from loraflow_shared.dataset.config import MAX_SEED, parse_config
from loraflow_shared.dataset.layout import MAX_PREVIEW_PROMPTS
from loraflow_training.batching import RandomStreams
from loraflow_training.effect import MAX_PROMPTS as EFFECT_PROMPTS
from loraflow_training.train import seed_everything

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

LARGEST_SEEDS = f"seed = {MAX_SEED}\n[loraflow]\npreview_seed = {MAX_SEED}\n".encode()


def test_given_largest_training_seed_when_the_trainer_seeds_then_every_generator_accepts_it() -> None:
    seed = parse_config(LARGEST_SEEDS, "c.toml").config.seed

    seed_everything(seed)
    streams = RandomStreams.seeded(seed, torch.device("cpu"))
    effect_generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(EFFECT_PROMPTS)]

    assert streams.noise.initial_seed() == seed == MAX_SEED
    assert effect_generators[-1].initial_seed() == MAX_SEED + EFFECT_PROMPTS - 1


def test_given_largest_preview_seed_with_most_prompts_when_rendered_then_every_prompt_gets_its_seed(
    tiny_model: Path, tmp_path: Path
) -> None:
    seed = parse_config(LARGEST_SEEDS, "c.toml").config.loraflow.preview_seed
    pipe = load_pipeline(str(tiny_model), device=torch.device("cpu"), dtype=torch.float32, cache_dir=tmp_path)
    prompts = [f"ohwx {index}" for index in range(MAX_PREVIEW_PROMPTS)]

    images = render_prompts(pipe, prompts, steps=1, resolution=64, seed=seed)

    assert len(images) == MAX_PREVIEW_PROMPTS  # prompt i renders with seed + i: up to MAX_SEED + 7


def test_given_seed_past_torch_range_when_a_generator_is_seeded_then_torch_refuses_it() -> None:
    """torch's own limit, far above MAX_SEED + MAX_PREVIEW_PROMPTS: the seed bound is numpy's, not torch's."""
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        torch.Generator("cpu").manual_seed(2**64)
