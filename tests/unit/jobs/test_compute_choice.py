"""Which compute a job gets, from what ingest can know before training: the config's claim, an S3 folder's
model_index.json, a published Hub id."""

from __future__ import annotations

import json

import pytest
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode
from loraflow_shared.families import FAMILY_FACTS, facts_for_class_name, facts_for_hub_repo
from loraflow_shared.jobs.compute import choose_compute

FOLDER = "s3://models/base/flux-dev/"


def index_reader(class_name: str | None) -> tuple[list[str], object]:
    asked: list[str] = []

    def read(uri: str) -> str | None:
        asked.append(uri)
        return None if class_name is None else json.dumps({"_class_name": class_name})

    return asked, read


def test_given_folder_with_flux_index_when_chosen_then_flux_on_large_compute_read_from_its_index() -> None:
    asked, read = index_reader("FluxPipeline")

    choice = choose_compute(TrainingConfig(), FOLDER, read)  # type: ignore[arg-type]

    assert (choice.model_family, choice.compute, choice.error, choice.warnings) == (
        "flux1",
        "large",
        None,
        [],
    )
    assert asked == ["s3://models/base/flux-dev/model_index.json"]


def test_given_claim_only_when_index_is_missing_then_the_claim_decides() -> None:
    _, read = index_reader(None)

    choice = choose_compute(TrainingConfig(model_family="qwen_image"), FOLDER, read)  # type: ignore[arg-type]

    assert (choice.model_family, choice.compute) == ("qwen_image", "large")


@pytest.mark.parametrize(
    ("config", "path"),
    [(TrainingConfig(sdxl=False), "sdxl"), (TrainingConfig(model_family="z_image"), "model_family")],
)
def test_given_claim_contradicting_the_index_when_chosen_then_error_on_the_claiming_key(
    config: TrainingConfig, path: str
) -> None:
    _, read = index_reader("FluxPipeline")

    choice = choose_compute(config, FOLDER, read)  # type: ignore[arg-type]

    assert choice.error is not None
    assert (choice.error.code, choice.error.path) == (ErrorCode.INVALID_CONFIG, path)
    assert "FLUX.1" in choice.error.message and "model_index.json" in choice.error.message


def test_given_single_file_checkpoint_when_chosen_then_nothing_is_read_and_a_warning_names_the_key() -> None:
    asked, read = index_reader("FluxPipeline")

    choice = choose_compute(TrainingConfig(), "s3://models/flux.safetensors", read)  # type: ignore[arg-type]

    assert asked == [] and (choice.model_family, choice.compute) == (None, "standard")
    [warning] = choice.warnings
    assert warning.path == "model_family" and "FLUX.1 or Qwen-Image" in warning.message


def test_given_published_hub_id_in_any_case_when_chosen_then_its_family_without_reading_s3() -> None:
    asked, read = index_reader(None)

    choice = choose_compute(TrainingConfig(), "Black-Forest-Labs/FLUX.1-schnell", read)  # type: ignore[arg-type]

    assert asked == [] and (choice.model_family, choice.compute) == ("flux1", "large")


def test_given_large_family_on_a_stack_without_large_compute_when_chosen_then_error_says_how_to_enable() -> (
    None
):
    _, read = index_reader("QwenImagePipeline")

    choice = choose_compute(TrainingConfig(), FOLDER, read, large_models=False)  # type: ignore[arg-type]

    assert choice.error is not None and choice.error.path == "pretrained_model_name_or_path"
    assert "Qwen-Image" in choice.error.message and "LargeModelFamilies=true" in choice.error.message


@pytest.mark.parametrize(
    "text", ["not json", "[]", '{"_class_name": 3}', '{"_class_name": "KandinskyPipeline"}']
)
def test_given_unusable_model_index_when_chosen_then_unknown_family_on_standard_compute(text: str) -> None:
    choice = choose_compute(TrainingConfig(), FOLDER, lambda _: text)

    assert (choice.model_family, choice.compute, choice.error) == (None, "standard", None)
    assert [w.code for w in choice.warnings] == [ErrorCode.SETTING_ADJUSTED]


def test_given_every_family_when_looked_up_by_its_pipelines_and_repos_then_itself() -> None:
    for facts in FAMILY_FACTS:
        assert all(facts_for_class_name(name) is facts for name in facts.pipeline_class_names)
        assert all(facts_for_hub_repo(repo) is facts for repo in facts.hub_repos)
        assert all(repo == repo.lower() for repo in facts.hub_repos)
