from __future__ import annotations

import pytest
from loraflow_shared.contracts import ExecutionInput, PreviewRequest, TrainingProgress, TrainingReport
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.model import checkpoint_prefix, progress_key, training_job_name
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
        attempt=2,
        dataset="ds",
        dataset_s3_uri="s3://datasets/ds/",
        config_file="config.toml",
        base_model="m",
    )
    assert ExecutionInput.model_validate_json(value.model_dump_json()) == value


def test_given_report_from_an_older_trainer_when_validated_then_no_warnings_and_no_kohya_name() -> None:
    report = TrainingReport.model_validate({"steps": 2, "final_loss": None, "seconds": 1.0})

    assert (report.warnings, report.output_name, report.epochs, report.peak_rss_mb) == ([], None, None, None)


def test_given_report_with_training_warnings_when_validated_then_kept_as_problems() -> None:
    weak = {"code": "WEAK_LORA", "path": "", "message": "outputs barely changed"}

    report = TrainingReport.model_validate(
        {"steps": 2, "final_loss": 0.5, "seconds": 1.0, "warnings": [weak]}
    )

    assert report.warnings == [Problem(code=ErrorCode.WEAK_LORA, path="", message="outputs barely changed")]


@pytest.mark.parametrize("code", ["NAN_LOSS", "OUT_OF_MEMORY", "NOT_A_CODE"])
def test_given_report_listing_a_non_warning_when_validated_then_refused(code: str) -> None:
    warning = {"code": code, "path": "", "message": "x"}

    with pytest.raises(ValidationError, match=code):
        TrainingReport.model_validate({"steps": 2, "final_loss": 0.5, "seconds": 1.0, "warnings": [warning]})


def test_given_progress_file_with_extra_keys_when_validated_then_read_and_extras_ignored() -> None:
    progress = TrainingProgress.model_validate_json(
        '{"step": 3, "total_steps": 9, "loss": 0.25, "eta_seconds": 12, "updated_at": "2025-01-15T10:00:00Z",'
        ' "lr": 0.0001}'
    )

    assert (progress.step, progress.total_steps, progress.loss, progress.eta_seconds) == (3, 9, 0.25, 12.0)
    assert "lr" not in progress.model_dump()


def test_given_job_id_when_checkpoint_location_derived_then_one_per_job_whatever_the_attempt() -> None:
    # Attempts and resubmissions share it, so each resumes from the last checkpoint.
    assert checkpoint_prefix("abc") == "checkpoints/abc/"
    assert training_job_name("abc", 2, 3) not in checkpoint_prefix("abc")
    assert progress_key("abc") == "checkpoints/abc/progress.json"
