"""A generation's negative prompt and guidance reach each pipeline as its call takes them
(`ModelFamily.sampling_arguments`), over the family's own preview arguments; never silently dropped."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from loraflow_diffusion.families import FAMILIES
from loraflow_diffusion.families.flux2_klein import Flux2Klein
from loraflow_diffusion.families.qwen_image import QwenImage
from loraflow_diffusion.families.stable_diffusion import StableDiffusion15


class _WithNegativePrompt:
    """Stands in for a pipeline whose call takes a negative prompt (only its signature is read)."""

    def __call__(self, prompt: str, negative_prompt: str | None = None, guidance_scale: float = 7.5) -> Any:
        raise AssertionError("never called")


class _WithoutNegativePrompt:
    def __call__(self, prompt: str, guidance_scale: float = 4.0) -> Any:
        raise AssertionError("never called")


def test_given_negative_prompt_and_guidance_when_sampling_then_the_pipeline_arguments() -> None:
    family = StableDiffusion15()

    arguments = family.sampling_arguments(_WithNegativePrompt(), negative_prompt="blurry", guidance=3.0)  # type: ignore[arg-type]

    assert arguments == {"negative_prompt": "blurry", "guidance_scale": 3.0}
    assert family.sampling_arguments(_WithNegativePrompt()) == family.preview_arguments(_WithNegativePrompt())  # type: ignore[arg-type]


def test_given_true_cfg_family_when_guidance_given_then_its_true_cfg_scale_over_its_default_negative() -> (
    None
):
    family = QwenImage()

    assert family.sampling_arguments(_WithNegativePrompt(), guidance=2.5) == {  # type: ignore[arg-type]
        "negative_prompt": " ",
        "true_cfg_scale": 2.5,
    }
    assert (
        family.sampling_arguments(_WithNegativePrompt(), negative_prompt="blurry")["negative_prompt"]
        == "blurry"
    )  # type: ignore[arg-type]


def test_given_pipeline_without_negative_prompt_when_one_asked_then_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match="takes no negative prompt"):
        Flux2Klein().sampling_arguments(_WithoutNegativePrompt(), negative_prompt="blurry")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_given_each_family_when_its_facts_say_whether_it_takes_a_negative_prompt_then_its_pipeline_agrees(
    family: Any,
) -> None:
    """The API refuses a negative prompt from the family's facts (no torch there): they must be right."""
    parameters = inspect.signature(family.pipeline_class.__call__).parameters

    assert family.facts.takes_negative_prompt == ("negative_prompt" in parameters)
