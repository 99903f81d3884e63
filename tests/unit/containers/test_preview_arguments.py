"""Previews sample each model the way it is meant to be sampled: the renderer adds the family's own call
arguments where the pipeline's defaults do not (a distilled model's guidance, a true-CFG negative prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loraflow_diffusion.families import family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny import build_tiny_sd
from loraflow_diffusion.tiny_families import build_tiny_qwen_image, build_tiny_z_image
from loraflow_inference.handler import render_prompts

pytestmark = pytest.mark.slow  # builds and renders tiny diffusion models

CPU = torch.device("cpu")


def _load(model: Path, tmp_path: Path) -> Any:
    pipe = load_pipeline(str(model), device=CPU, dtype=torch.float32, cache_dir=tmp_path / "cache")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _direct(pipe: Any, **arguments: Any) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(5)
    result = pipe("ohwx", num_inference_steps=2, height=64, width=64, generator=generator, **arguments)
    return np.asarray(result.images[0])


def _previewed(pipe: Any) -> np.ndarray:
    return np.asarray(render_prompts(pipe, ["ohwx"], steps=2, resolution=64, seed=5)[0])


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda path: build_tiny_z_image(path, variant="turbo"), {"guidance_scale": 0.0}),
        (lambda path: build_tiny_qwen_image(path), {"negative_prompt": " "}),
    ],
    ids=["z-image-turbo", "qwen-image"],
)
def test_given_a_model_whose_defaults_mis_sample_it_when_previewed_then_rendered_with_its_own_arguments(
    tmp_path: Path, build: Any, expected: dict[str, Any]
) -> None:
    pipe = _load(build(tmp_path / "model"), tmp_path)

    previewed = _previewed(pipe)

    assert family_of(pipe).preview_arguments(pipe) == expected
    assert np.array_equal(previewed, _direct(pipe, **expected))
    assert not np.array_equal(previewed, _direct(pipe))  # the pipeline's defaults render otherwise


@pytest.mark.parametrize(
    "build",
    [lambda path: build_tiny_z_image(path, variant="base"), build_tiny_sd],
    ids=["z-image-base", "sd15"],
)
def test_given_a_model_its_pipeline_samples_right_when_previewed_then_the_pipeline_defaults(
    tmp_path: Path, build: Any
) -> None:
    pipe = _load(build(tmp_path / "model"), tmp_path)

    assert family_of(pipe).preview_arguments(pipe) == {}
    assert np.array_equal(_previewed(pipe), _direct(pipe))
