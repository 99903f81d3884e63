"""Previews honour kohya's `clip_skip` (SD 1.x only): they see the text features the LoRA learned on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from loraflow_diffusion.families import SupportedPipeline
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny import build_tiny_sdxl
from loraflow_inference.handler import render_prompts

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

PROMPT = "ohwx, a red circle"
STEPS, RESOLUTION, SEED = 2, 64, 5


def _load(model: Path, cache: Path) -> SupportedPipeline:
    return load_pipeline(str(model), device=torch.device("cpu"), dtype=torch.float32, cache_dir=cache)


def _penultimate_layer(pipe: SupportedPipeline, text: str) -> torch.Tensor:
    """kohya's clip_skip = 2, written out: the second-to-last hidden state through the final layer norm."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    encoder = pipe.text_encoder
    hidden = encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
    return encoder.final_layer_norm(hidden)


def _pixels(images: list) -> np.ndarray:
    return np.asarray(images[0], dtype=np.float64)


@torch.no_grad()
def test_given_clip_skip_2_when_rendered_then_prompt_and_negative_use_the_penultimate_layer(
    tiny_model: Path, tmp_path: Path
) -> None:
    pipe = _load(tiny_model, tmp_path)
    expected = pipe(
        prompt_embeds=_penultimate_layer(pipe, PROMPT),
        negative_prompt_embeds=_penultimate_layer(pipe, ""),
        num_inference_steps=STEPS,
        height=RESOLUTION,
        width=RESOLUTION,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images

    skipped = render_prompts(pipe, [PROMPT], STEPS, RESOLUTION, SEED, clip_skip=2)
    plain = render_prompts(pipe, [PROMPT], STEPS, RESOLUTION, SEED)

    assert np.array_equal(_pixels(skipped), _pixels(expected))
    assert np.abs(_pixels(skipped) - _pixels(plain)).max() > 0


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_given_no_clip_skip_or_1_when_rendered_then_same_as_the_plain_prompt(
    tiny_model: Path, tmp_path: Path, clip_skip: int | None
) -> None:
    pipe = _load(tiny_model, tmp_path)
    expected = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        height=RESOLUTION,
        width=RESOLUTION,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images

    rendered = render_prompts(pipe, [PROMPT], STEPS, RESOLUTION, SEED, clip_skip=clip_skip)

    assert np.array_equal(_pixels(rendered), _pixels(expected))


def test_given_sdxl_with_clip_skip_when_rendered_then_ignored_as_in_training(tmp_path: Path) -> None:
    pipe = _load(build_tiny_sdxl(tmp_path / "sdxl"), tmp_path / "cache")

    skipped = render_prompts(pipe, [PROMPT], STEPS, RESOLUTION, SEED, clip_skip=2)
    plain = render_prompts(pipe, [PROMPT], STEPS, RESOLUTION, SEED)

    assert np.array_equal(_pixels(skipped), _pixels(plain))
