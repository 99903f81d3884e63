"""Which compute a job gets, decided at ingest from what can be known before any weights load: the family
the config claims, the model_index.json of an S3 folder, or a family's published Hub id.

The training job's instance type and the preview endpoint follow the family's `ComputeClass`. A model
whose family cannot be told before training runs on the standard class and is told so (a warning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from loraflow_shared.base_models import parse_hub_model
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.families import (
    DEFAULT_COMPUTE,
    FAMILY_FACTS,
    MODEL_INDEX_FILE,
    ComputeClass,
    FamilyFacts,
    claimed_family_name,
    facts_for_hub_repo,
    facts_named,
    family_from_model_index,
)

# The text of an S3 object, None when it does not exist or cannot be read.
TextReader = Callable[[str], str | None]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")  # a checkpoint file, not a diffusers folder


@dataclass(frozen=True)
class ComputeChoice:
    model_family: str | None  # None: not known before training (the trainer finds it)
    compute: ComputeClass
    warnings: list[Problem] = field(default_factory=list)
    error: Problem | None = None  # the config's family contradicts the model's


def choose_compute(
    config: TrainingConfig,
    base_model: str,
    read_text: TextReader,
    large_models: bool = True,
    hub_model_index: str | None = None,
) -> ComputeChoice:
    """`large_models`: whether the stack has the large compute class (stack parameter LargeModelFamilies);
    `hub_model_index`: a Hub model's model_index.json, when ingest could read it."""
    claimed = claimed_family_name(config)
    detected, evidence = _detected_family(base_model, read_text, hub_model_index)
    if claimed is not None and detected is not None and detected.name != claimed:
        error = _contradiction(config, base_model, detected, evidence)
        return ComputeChoice(None, DEFAULT_COMPUTE, error=error)
    facts = detected or (facts_named(claimed) if claimed is not None else None)
    if facts is None:
        return ComputeChoice(None, DEFAULT_COMPUTE, warnings=[_unknown_family(base_model)])
    if facts.compute == "large" and not large_models:
        return ComputeChoice(facts.name, DEFAULT_COMPUTE, error=_no_large_compute(base_model, facts))
    return ComputeChoice(facts.name, facts.compute)


def _detected_family(
    base_model: str, read_text: TextReader, hub_model_index: str | None
) -> tuple[FamilyFacts | None, str]:
    hub = parse_hub_model(base_model)
    if hub is not None and hub_model_index is not None:
        return family_from_model_index(hub_model_index), f"its {MODEL_INDEX_FILE} on the Hub says so"
    if not base_model.startswith("s3://"):
        repo = hub.repo if hub is not None else base_model
        return facts_for_hub_repo(repo), "it is a published base model of that family"
    if base_model.lower().endswith(SINGLE_FILE_SUFFIXES):
        return None, ""
    text = read_text(f"{base_model.rstrip('/')}/{MODEL_INDEX_FILE}")
    return (family_from_model_index(text) if text is not None else None), f"its {MODEL_INDEX_FILE} says so"


def _contradiction(config: TrainingConfig, base_model: str, detected: FamilyFacts, evidence: str) -> Problem:
    key = "model_family" if config.model_family is not None else "sdxl"
    claim = (
        f'model_family = "{config.model_family}"'
        if config.model_family is not None
        else f"sdxl = {str(config.sdxl).lower()}"
    )
    return Problem(
        code=ErrorCode.INVALID_CONFIG,
        path=key,
        message=(
            f"{claim} contradicts the base model {base_model!r}, a {detected.label} model ({evidence});"
            f' set model_family = "{detected.name}" or remove the key'
        ),
    )


def _no_large_compute(base_model: str, facts: FamilyFacts) -> Problem:
    return Problem(
        code=ErrorCode.INVALID_CONFIG,
        path="pretrained_model_name_or_path",
        message=(
            f"{base_model!r} is a {facts.label} model, which trains on the large model instances; this stack"
            " was deployed without them (LargeModelFamilies=false): redeploy with LargeModelFamilies=true"
        ),
    )


def _unknown_family(base_model: str) -> Problem:
    large = " or ".join(f.label for f in FAMILY_FACTS if f.compute == "large")
    return Problem(
        code=ErrorCode.SETTING_ADJUSTED,
        path="model_family",
        message=(
            f"the family of {base_model!r} cannot be told before training, so it trains and previews on the"
            f" standard instances (24 GB GPUs); for a {large} model set model_family in the config so the"
            " job gets the large ones"
        ),
    )


@dataclass(frozen=True)
class ComputeTarget:
    """Where a job of one compute class trains and renders (stack parameters and resources)."""

    training_instance_type: str
    preview_endpoint_name: str


def preview_endpoints(standard: str, large: str) -> dict[ComputeClass, str]:
    """Each compute class's preview endpoint; the large class only on a stack that has it (`large` names
    one: stack parameter LargeModelFamilies)."""
    endpoints: dict[ComputeClass, str] = {"standard": standard}
    if large:
        endpoints["large"] = large
    return endpoints
