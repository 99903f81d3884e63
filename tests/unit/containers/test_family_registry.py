"""The family registry: one specification per family, each complete, and the config's names agree."""

from __future__ import annotations

import typing

import pytest
from loraflow_diffusion.families import FAMILIES, claimed_family, family_for_class_name, family_named
from loraflow_shared.dataset.config import ModelFamilyName, TrainingConfig


def test_given_config_and_registry_when_family_names_compared_then_the_same() -> None:
    assert set(typing.get_args(ModelFamilyName)) == {family.name for family in FAMILIES}


def test_given_registry_when_pipeline_classes_compared_then_each_names_one_family() -> None:
    names = [name for family in FAMILIES for name in family.pipeline_class_names]

    assert len(names) == len(set(names))
    assert all(family_for_class_name(family.pipeline_class.__name__) is family for family in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_given_each_family_when_specified_then_every_part_is_there(family: typing.Any) -> None:
    assert family.description.startswith(("a ", "an "))
    assert family.config_claim.startswith(family.config_key)
    assert family.denoiser_target_modules and family.text_encoder_names
    assert set(family.lora_components()) <= {family.denoiser_name, *family.text_encoder_names}
    assert family.footprint.denoiser_params > family.footprint.denoiser_lora_params_per_rank > 0
    # Every key a family ignores is a config key (a typo would silently ignore nothing).
    assert family.ignored_config_keys <= set(TrainingConfig.model_fields)


@pytest.mark.parametrize(
    ("sdxl", "model_family", "expected"),
    [(None, None, None), (True, None, "sdxl"), (False, None, "sd15"), (None, "flux1", "flux1")],
)
def test_given_config_keys_when_claimed_family_read_then_the_family_they_name(
    sdxl: bool | None, model_family: str | None, expected: str | None
) -> None:
    assert claimed_family(sdxl, model_family) == expected
    if expected is not None:
        assert family_named(expected).name == expected


def test_given_lambda_side_facts_when_compared_with_the_specifications_then_one_spec_per_family() -> None:
    from loraflow_shared.families import FAMILY_FACTS

    by_name = {family.name: family.facts for family in FAMILIES}
    assert len(by_name) == len(FAMILIES) and by_name == {facts.name: facts for facts in FAMILY_FACTS}
    for family in FAMILIES:  # what the Lambda functions recognise is what the containers load
        assert (family.name, family.pipeline_class_names) == (
            family.facts.name,
            family.facts.pipeline_class_names,
        )
        assert family.pipeline_class.__name__ in family.pipeline_class_names
