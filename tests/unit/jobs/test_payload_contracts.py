from __future__ import annotations

import pytest
from loraflow_shared.contracts import ExecutionInput, PreviewRequest, TrainingReport
from pydantic import ValidationError

REQUEST = {
    "job_id": "abc",
    "base_model": "s3://artifacts/base-models/tiny-sd/",
    "lora_s3_uri": "s3://artifacts/jobs/abc/lora/pytorch_lora_weights.safetensors",
    "prompts": ["a photo of zqxj dog"],
    "steps": 4,
    "resolution": 64,
    "seed": 0,
    "output_s3_prefix": "s3://artifacts/jobs/abc/previews/",
}


@pytest.mark.parametrize(
    ("field", "value"),
    [("resolution", 60), ("steps", 0), ("prompts", []), ("lora_s3_uri", "/tmp/lora"), ("seed", -1)],
)
def test_given_request_with_bad_field_when_validated_then_error_names_it(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as raised:
        PreviewRequest.model_validate({**REQUEST, field: value})
    assert raised.value.errors()[0]["loc"][0] == field


def test_given_request_with_unknown_key_when_validated_then_refused() -> None:
    with pytest.raises(ValidationError, match="promts"):
        PreviewRequest.model_validate({**REQUEST, "promts": ["typo"]})


def test_given_report_with_extra_metrics_when_validated_then_kept() -> None:
    report = TrainingReport.model_validate(
        {"steps": 2, "final_loss": 0.5, "seconds": 1.0, "ignored_keys": ["xformers"], "device": "cpu"}
    )
    assert report.model_dump()["device"] == "cpu"


def test_given_report_with_nan_loss_when_validated_then_refused() -> None:
    with pytest.raises(ValidationError, match="final_loss"):
        TrainingReport.model_validate_json('{"steps": 2, "final_loss": NaN, "seconds": 1.0}')


def test_given_execution_input_when_dumped_and_loaded_then_equal() -> None:
    value = ExecutionInput(
        job_id="abc",
        dataset="ds",
        dataset_s3_uri="s3://datasets/ds/",
        config_file="config.toml",
        base_model="m",
    )
    assert ExecutionInput.model_validate_json(value.model_dump_json()) == value
