"""What the Lambda functions know of each model family: its name, how its models are recognised without
loading them, and the class of compute it trains and renders on.

The containers' family specifications (`loraflow_diffusion.families`) take their name and pipeline
classes from here, so a family is named once; everything that needs torch stays on the specification.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, get_args

from loraflow_shared.dataset.config import ModelFamilyName, TrainingConfig

# Which stack parameters a job's training job and preview endpoint use: "standard" (TrainingInstanceType,
# InferenceInstanceType: 24 GB GPUs) or "large" (the LargeModel* parameters: 48 GB GPUs).
ComputeClass = Literal["standard", "large"]
COMPUTE_CLASSES: tuple[ComputeClass, ...] = get_args(ComputeClass)
DEFAULT_COMPUTE: ComputeClass = "standard"
MODEL_INDEX_FILE = "model_index.json"  # a diffusers folder's pipeline description (`_class_name`)
# What kohya's `sdxl` key claims: `sdxl = true` an SDXL model, `sdxl = false` an SD 1.x/2.x one.
SDXL_KEY_CLAIMS: dict[bool, ModelFamilyName] = {True: "sdxl", False: "sd15"}


@dataclass(frozen=True)
class FamilyFacts:
    name: ModelFamilyName
    label: str  # how people write it: "FLUX.1"
    # `_class_name` values of a diffusers folder's model_index.json that load as this family.
    pipeline_class_names: frozenset[str]
    compute: ComputeClass
    # The family's published base models on the Hugging Face Hub (lower case), recognised by id alone.
    hub_repos: frozenset[str]
    # Whether its pipeline takes a negative prompt (FLUX.2 klein's does not): a generation asking for one
    # is refused when it is asked for, not when it renders.
    takes_negative_prompt: bool = True


# Compute: a LoRA on a bf16 base with cached text embeddings and gradient checkpointing needs about the
# base's weights plus a few GB. SD 1.5 (0.9B), SDXL (2.6B), Z-Image (6B) and FLUX.2 klein (4B; 9B with
# the memory plan's savings) fit 24 GB; FLUX.1 (12B, 24 GB of weights) and Qwen-Image (20B) do not.
FAMILY_FACTS: tuple[FamilyFacts, ...] = (
    FamilyFacts(
        "sd15",
        "SD 1.5",
        frozenset({"StableDiffusionPipeline"}),
        "standard",
        frozenset({"stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"}),
    ),
    FamilyFacts(
        "sdxl",
        "SDXL",
        frozenset({"StableDiffusionXLPipeline"}),
        "standard",
        frozenset({"stabilityai/stable-diffusion-xl-base-1.0"}),
    ),
    FamilyFacts(
        "flux1",
        "FLUX.1",
        frozenset({"FluxPipeline"}),
        "large",
        frozenset({"black-forest-labs/flux.1-dev", "black-forest-labs/flux.1-schnell"}),
    ),
    FamilyFacts(
        "flux2_klein",
        "FLUX.2 klein",
        frozenset({"Flux2KleinPipeline"}),
        "standard",
        frozenset(
            f"black-forest-labs/flux.2-klein-{kind}{size}" for kind in ("", "base-") for size in ("4b", "9b")
        ),
        takes_negative_prompt=False,
    ),
    FamilyFacts(
        "qwen_image", "Qwen-Image", frozenset({"QwenImagePipeline"}), "large", frozenset({"qwen/qwen-image"})
    ),
    FamilyFacts(
        "z_image",
        "Z-Image",
        frozenset({"ZImagePipeline"}),
        "standard",
        frozenset({"tongyi-mai/z-image-turbo", "tongyi-mai/z-image"}),
    ),
)


def facts_named(name: str) -> FamilyFacts:
    facts = next((f for f in FAMILY_FACTS if f.name == name), None)
    if facts is None:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILY_FACTS)}")
    return facts


def facts_for_class_name(class_name: str) -> FamilyFacts | None:
    return next((f for f in FAMILY_FACTS if class_name in f.pipeline_class_names), None)


def facts_for_hub_repo(repo_id: str) -> FamilyFacts | None:
    wanted = repo_id.strip().lower()
    return next((f for f in FAMILY_FACTS if wanted in f.hub_repos), None)


def claimed_family_name(config: TrainingConfig) -> ModelFamilyName | None:
    """The family a training config says its model is (`model_family`, or kohya's `sdxl`), None when it
    does not say; validation refuses a config whose two keys disagree."""
    if config.model_family is not None:
        return config.model_family
    return None if config.sdxl is None else SDXL_KEY_CLAIMS[config.sdxl]


def family_from_model_index(text: str) -> FamilyFacts | None:
    """The family a diffusers folder's model_index.json names (None: not JSON, or no family's pipeline)."""
    try:
        index = json.loads(text)
    except ValueError:
        return None
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    return facts_for_class_name(class_name) if isinstance(class_name, str) else None
