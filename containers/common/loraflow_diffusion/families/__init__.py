"""The model families loraflow trains, one specification each (`base.ModelFamily`), and how to find one.

Everything that differs between families lives on the family's specification: recognising a model,
its components (denoiser, VAE, text encoders), prompt and image encoding, the training objective, the
denoiser's forward, the LoRA targets, the export names and metadata, the memory footprint and the
defaults. Nothing outside `loraflow_diffusion.families` branches on a family's name: adding a family is
adding its specification (and its tiny builder and tests) to `FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Collection

from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from loraflow_shared.families import SDXL_KEY_CLAIMS

from loraflow_diffusion.families.base import (
    Conditioning,
    DdpmObjective,
    FlowMatchingObjective,
    Footprint,
    ModelFamily,
    ObjectiveSpec,
    Size,
    SupportedPipeline,
    TextEmbeddings,
)
from loraflow_diffusion.families.flux import Flux1
from loraflow_diffusion.families.flux2_klein import Flux2Klein
from loraflow_diffusion.families.qwen_image import QwenImage
from loraflow_diffusion.families.stable_diffusion import StableDiffusion15, StableDiffusionXL
from loraflow_diffusion.families.z_image import ZImage

__all__ = [
    "FAMILIES",
    "Conditioning",
    "DdpmObjective",
    "FlowMatchingObjective",
    "Footprint",
    "ModelFamily",
    "ObjectiveSpec",
    "Size",
    "SupportedPipeline",
    "TextEmbeddings",
    "claimed_family",
    "family_for_checkpoint_keys",
    "family_for_class_name",
    "family_named",
    "family_of",
    "supported_class_names",
]

FAMILIES: tuple[ModelFamily, ...] = (
    StableDiffusion15(),
    StableDiffusionXL(),
    Flux1(),
    ZImage(),
    Flux2Klein(),
    QwenImage(),
)


def family_for_class_name(class_name: str) -> ModelFamily | None:
    return next((f for f in FAMILIES if class_name in f.pipeline_class_names), None)


def family_for_checkpoint_keys(keys: Collection[str]) -> ModelFamily | None:
    return next((f for f in FAMILIES if f.single_file_marker_key in keys), None)


def family_named(name: str) -> ModelFamily:
    family = next((f for f in FAMILIES if f.name == name), None)
    if family is None:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
    return family


def claimed_family(sdxl: bool | None, model_family: str | None = None) -> str | None:
    """The family a training config says its model is (`model_family`, or kohya's `sdxl` key), None when
    it does not say. `load_pipeline(expect_family=...)` refuses a model of another family before loading it.
    Validation refuses a config whose two keys disagree."""
    if model_family is not None:
        return family_named(model_family).name
    return None if sdxl is None else SDXL_KEY_CLAIMS[sdxl]


def family_of(pipe: DiffusionPipeline) -> ModelFamily:
    family = family_for_class_name(type(pipe).__name__)
    if family is None:
        raise TypeError(f"{type(pipe).__name__} is not a supported model family")
    return family


def supported_class_names() -> list[str]:
    return sorted(name for family in FAMILIES for name in family.pipeline_class_names)
