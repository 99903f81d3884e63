"""`record_training`: both LoRA formats published, the report's warnings and summary recorded on the job."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from functions_aws import ARTIFACTS_BUCKET, REGION, Cloud, FakeLambdaContext
from loraflow_pipeline.logic import PipelineTasks
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.model import JobStatus
from loraflow_shared.jobs.repository import JobRepository
from pipeline_kit import JOB_ID, job_in, model_archive, read, record_payload, run

DIFFUSERS_LORA = b"diffusers-keys" * 100
KOHYA_LORA = b"kohya-keys" * 100
LORA_PREFIX = f"jobs/{JOB_ID}/lora/"
VALIDATION_WARNING = Problem(
    code=ErrorCode.IGNORED_CONFIG_KEY, path="config.toml", message="xformers is ignored"
)
WEAK = {"code": "WEAK_LORA", "path": "", "message": "outputs changed by 0.1% on the training prompts"}
ADJUSTED = {"code": "SETTING_ADJUSTED", "path": "", "message": "AdamW8bit needs CUDA: AdamW used"}


@pytest.fixture
def repository(cloud: Cloud) -> JobRepository:
    repository = JobRepository(cloud.table)
    job_in(repository, JobStatus.TRAINING)
    repository.update(JOB_ID, warnings=[VALIDATION_WARNING])  # what validation found at ingest
    return repository


def _report(**fields: Any) -> bytes:
    return json.dumps({"steps": 40, "final_loss": 0.125, "seconds": 12.5, **fields}).encode()


def _record(tasks: PipelineTasks, context: FakeLambdaContext, members: dict[str, bytes]) -> Any:
    return run(tasks, context, record_payload(model_archive(members)))


def _keys(prefix: str) -> set[str]:
    listed = boto3.client("s3", region_name=REGION).list_objects_v2(Bucket=ARTIFACTS_BUCKET, Prefix=prefix)
    return {item["Key"][len(prefix) :] for item in listed.get("Contents", [])}


def test_given_kohya_file_named_by_report_when_recorded_then_published_beside_the_diffusers_lora(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    members = {
        "training_report.json": _report(output_name="zqxj-v1", epochs=4),
        "zqxj-v1.safetensors": KOHYA_LORA,
        "pytorch_lora_weights.safetensors": DIFFUSERS_LORA,
    }

    result = _record(tasks, context, members)

    artifacts = repository.require(JOB_ID).artifacts
    assert artifacts is not None
    assert artifacts.lora_kohya_s3_uri == f"s3://{ARTIFACTS_BUCKET}/{LORA_PREFIX}zqxj-v1.safetensors"
    assert artifacts.lora_diffusers_s3_uri == result["lora_s3_uri"]
    assert read(f"{LORA_PREFIX}zqxj-v1.safetensors") == KOHYA_LORA
    assert read(f"{LORA_PREFIX}pytorch_lora_weights.safetensors") == DIFFUSERS_LORA


def test_given_report_with_warnings_and_metrics_when_recorded_then_job_has_them_once_even_if_retried(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    curve = [{"step": 20, "loss": 0.25}, {"step": 40, "loss": 0.125}]
    loss = {"first": 0.25, "last": 0.125, "min": 0.125, "min_step": 40, "curve": curve}
    report = _report(
        warnings=[WEAK, ADJUSTED], epochs=4, peak_rss_mb=812.5, peak_cuda_mb=6144.0, extra=1, loss=loss
    )
    members = {"pytorch_lora_weights.safetensors": DIFFUSERS_LORA, "training_report.json": report}

    _record(tasks, context, members)
    _record(tasks, context, members)  # a retried step

    job = repository.require(JOB_ID)
    assert job.warnings == [VALIDATION_WARNING, Problem(**WEAK), Problem(**ADJUSTED)]
    assert job.training is not None
    assert job.training.model_dump() == {
        "job_name": f"loraflow-{JOB_ID}-1-1",
        "steps": 40,
        "final_loss": 0.125,
        "seconds": 12.5,
        "epochs": 4,
        "peak_rss_mb": 812.5,
        "peak_cuda_mb": 6144.0,
        "loss_curve": curve,
    }
    assert job.status is JobStatus.TRAINING  # recording changes no status


@pytest.mark.parametrize(
    ("report_fields", "weights", "expected"),
    [
        ({}, ["my-lora.safetensors"], "my-lora.safetensors"),  # the only other weights file
        ({"output_name": "gone"}, ["my-lora.safetensors"], "my-lora.safetensors"),
        ({}, ["a.safetensors", "b.safetensors"], None),  # ambiguous without the report's name
        ({"output_name": "b"}, ["a.safetensors", "b.safetensors"], "b.safetensors"),
        ({"output_name": "demo-lora"}, [], None),  # a trainer that wrote no kohya file
    ],
)
def test_given_weights_in_archive_when_recorded_then_kohya_file_chosen_by_report_or_uniqueness(
    tasks: PipelineTasks,
    repository: JobRepository,
    context: FakeLambdaContext,
    report_fields: dict[str, str],
    weights: list[str],
    expected: str | None,
) -> None:
    members = {
        "pytorch_lora_weights.safetensors": DIFFUSERS_LORA,
        "training_report.json": _report(**report_fields),
        **dict.fromkeys(weights, KOHYA_LORA),
    }

    _record(tasks, context, members)

    artifacts = repository.require(JOB_ID).artifacts
    assert artifacts is not None
    expected_uri = None if expected is None else f"s3://{ARTIFACTS_BUCKET}/{LORA_PREFIX}{expected}"
    assert artifacts.lora_kohya_s3_uri == expected_uri


def test_given_other_members_when_recorded_then_only_top_level_weights_and_report_are_published(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    members = {
        "pytorch_lora_weights.safetensors": DIFFUSERS_LORA,
        "training_report.json": _report(),
        "samples/step-10.safetensors": b"nested",
        "notes.txt": b"not an artifact",
    }

    _record(tasks, context, members)

    assert _keys(f"jobs/{JOB_ID}/") == {"lora/pytorch_lora_weights.safetensors", "training_report.json"}


def test_given_report_listing_a_failure_code_as_warning_when_recorded_then_training_failed_naming_it(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    nan = {"code": "NAN_LOSS", "path": "", "message": "loss became nan"}
    members = {
        "pytorch_lora_weights.safetensors": DIFFUSERS_LORA,
        "training_report.json": _report(warnings=[nan]),
    }

    with pytest.raises(Exception) as raised:
        _record(tasks, context, members)

    assert type(raised.value).__name__ == "TRAINING_FAILED"
    assert "NAN_LOSS" in json.loads(str(raised.value))["message"]
    assert repository.require(JOB_ID).artifacts is None
