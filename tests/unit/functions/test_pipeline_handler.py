from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from functions_aws import (
    ARTIFACTS_BUCKET,
    ENDPOINT_NAME,
    LARGE_MODEL_ENDPOINT_NAME,
    REGION,
    Cloud,
    FakeLambdaContext,
    load_event,
    sent_requests,
)
from loraflow_pipeline.base_model_inputs import channel
from loraflow_pipeline.logic import PipelineTasks
from loraflow_shared.base_models import DATASET_CHANNEL
from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.model import JobStatus
from loraflow_shared.jobs.repository import JobRepository
from moto.sagemakerruntime.models import sagemakerruntime_backends
from pipeline_kit import JOB_ID, job_in, model_archive, read, record_payload, run, step


def test_given_queued_job_when_training_marked_then_training(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.QUEUED)
    run_state = {
        "training_job_name": f"loraflow-{JOB_ID}-1-1",
        "instance_type": "ml.g5.2xlarge",
        # An S3 base model: the dataset's channel only, and the model as the config named it.
        "channels": [channel(DATASET_CHANNEL, "s3://loraflow-datasets/0001-dataset/")],
        "base_model": "s3://loraflow-artifacts/base-models/tiny-sd/",
        "base_model_mirror": "",
    }
    assert run(tasks, context, step("mark_training")) == run_state
    assert run(tasks, context, step("mark_training")) == run_state
    job = repository.require(JOB_ID)
    assert job.status is JobStatus.TRAINING
    assert job.attempts[0].training_job_names == [f"loraflow-{JOB_ID}-1-1"]  # a retried step names it once


def test_given_validating_job_when_training_marked_then_error_named_for_the_state_machine(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.VALIDATING)
    with pytest.raises(Exception) as raised:
        run(tasks, context, step("mark_training"))
    assert type(raised.value).__name__ == "INTERNAL_ERROR"
    assert "VALIDATING" in json.loads(str(raised.value))["message"]


def test_given_model_archive_when_training_recorded_then_lora_and_report_copied_and_job_updated(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.TRAINING)
    lora = bytes(range(256)) * 64
    report = {"steps": 2, "final_loss": 0.1875, "seconds": 3.5, "ignored_keys": ["xformers"], "device": "cpu"}
    payload = record_payload(
        model_archive(
            {"pytorch_lora_weights.safetensors": lora, "training_report.json": json.dumps(report).encode()}
        )
    )

    result = run(tasks, context, payload)

    lora_key = f"jobs/{JOB_ID}/lora/pytorch_lora_weights.safetensors"
    assert result == {"lora_s3_uri": f"s3://{ARTIFACTS_BUCKET}/{lora_key}"}
    assert read(lora_key) == lora
    assert json.loads(read(f"jobs/{JOB_ID}/training_report.json")) == report
    job = repository.require(JOB_ID)
    assert job.training is not None and job.artifacts is not None
    assert (job.training.job_name, job.training.steps, job.training.final_loss) == (
        f"loraflow-{JOB_ID}-1-1",
        2,
        0.1875,
    )
    assert job.artifacts.lora_diffusers_s3_uri == result["lora_s3_uri"]
    # Spot: billed 480 of 1200 s on ml.g5.2xlarge at the stack's 1.515 USD/h.
    assert job.cost is not None and job.attempts[0].cost == job.cost
    assert (job.cost.billable_seconds, job.cost.training_seconds, job.cost.spot) == (480, 1200, True)
    assert job.cost.estimated_usd == round(480 / 3600 * 1.515, 4)


def test_given_archive_without_lora_when_training_recorded_then_training_failed(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.TRAINING)
    payload = record_payload(
        model_archive({"training_report.json": b'{"steps": 1, "final_loss": 1, "seconds": 1}'})
    )
    with pytest.raises(Exception) as raised:
        run(tasks, context, payload)
    assert type(raised.value).__name__ == "TRAINING_FAILED"
    assert "pytorch_lora_weights.safetensors" in json.loads(str(raised.value))["message"]


@pytest.fixture
def async_invocations(cloud: Cloud) -> Iterator[list[dict[str, Any]]]:
    """InvokeEndpointAsync requests as they leave boto3 (moto does not keep their timeouts)."""
    with sent_requests("sagemaker-runtime.InvokeEndpointAsync") as sent:
        yield sent


def test_given_trained_job_when_previews_requested_then_request_written_and_endpoint_invoked(
    async_invocations: list[dict[str, Any]],  # first: the handler's client is built after it listens
    tasks: PipelineTasks,
    repository: JobRepository,
    context: FakeLambdaContext,
) -> None:
    job_in(repository, JobStatus.TRAINING)
    lora_uri = f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}/lora/pytorch_lora_weights.safetensors"
    payload = step("request_previews", task_token="token-1", lora_s3_uri=lora_uri)

    assert run(tasks, context, payload) == {}

    job = repository.require(JOB_ID)
    assert (job.status, job.preview_task_token) == (JobStatus.GENERATING_PREVIEWS, "token-1")
    request_key = f"async-inference/requests/{JOB_ID}-1.json"
    request = PreviewRequest.model_validate_json(read(request_key))
    assert request.prompts == ["a photo of zqxj dog", "zqxj dog"]
    assert (request.steps, request.resolution, request.seed, request.lora_s3_uri) == (3, 64, 7, lora_uri)
    assert request.clip_skip == 2  # the previews see the text features the LoRA was trained on
    assert request.output_s3_prefix == f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}/previews/"
    assert request.cancel_s3_uri == f"s3://{ARTIFACTS_BUCKET}/async-inference/cancelled/{JOB_ID}-1"
    invoked = sagemakerruntime_backends["123456789012"][REGION].async_results[ENDPOINT_NAME]
    assert list(invoked) == [f"s3://{ARTIFACTS_BUCKET}/{request_key}"]
    # PREVIEW_TIMEOUT_SECONDS=3600: the request runs at most 1800 s after queueing at most 1680 s, so the
    # state machine's wait (3600 s) always outlasts it.
    [invocation] = async_invocations
    assert (invocation["InferenceId"], invocation["InvocationTimeoutSeconds"]) == (f"{JOB_ID}-1", 1800)
    assert invocation["RequestTTLSeconds"] == 3600 - 1800 - 120


def test_given_large_model_job_when_marked_and_previewed_then_large_instance_and_large_endpoint(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.QUEUED, compute="large")
    lora_uri = f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}/lora/pytorch_lora_weights.safetensors"

    marked = run(tasks, context, step("mark_training"))
    run(tasks, context, step("request_previews", task_token="token-1", lora_s3_uri=lora_uri))

    assert marked["instance_type"] == "ml.g6e.2xlarge"
    backend = sagemakerruntime_backends["123456789012"][REGION]
    assert list(backend.async_results[LARGE_MODEL_ENDPOINT_NAME]) == [
        f"s3://{ARTIFACTS_BUCKET}/async-inference/requests/{JOB_ID}-1.json"
    ]
    assert ENDPOINT_NAME not in backend.async_results


def test_given_previews_rendered_when_completed_then_completed_and_notified_once(
    tasks: PipelineTasks, repository: JobRepository, cloud: Cloud, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.GENERATING_PREVIEWS)
    previews = {
        "job_id": JOB_ID,
        "previews": [
            {
                "prompt": "zqxj dog",
                "s3_uri": "s3://a/jobs/x/previews/0.png",
                "base_s3_uri": "s3://a/jobs/x/previews/base-0.png",
            }
        ],
        "contact_sheet_s3_uri": "s3://a/jobs/x/previews/contact-sheet.png",
    }
    payload = step("complete", previews=previews)

    run(tasks, context, payload)
    run(tasks, context, payload)  # a retried step must not notify twice

    job = repository.require(JOB_ID)
    assert job.status is JobStatus.COMPLETED
    assert [(p.prompt, p.s3_uri, p.base_s3_uri) for p in job.previews] == [
        ("zqxj dog", "s3://a/jobs/x/previews/0.png", "s3://a/jobs/x/previews/base-0.png")
    ]
    assert job.contact_sheet_s3_uri == "s3://a/jobs/x/previews/contact-sheet.png"
    assert job.preview_task_token is None
    [envelope] = cloud.notifications()
    assert json.loads(envelope["Message"])["status"] == "COMPLETED"


def test_given_training_failure_cause_when_failed_then_failed_with_container_problem(
    tasks: PipelineTasks, repository: JobRepository, cloud: Cloud, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.TRAINING)
    payload = load_event("sfn_fail_training.json")

    assert run(tasks, context, payload) == {"status": "FAILED"}

    job = repository.require(JOB_ID)
    assert job.status is JobStatus.FAILED
    assert job.cost is not None and job.cost.billable_seconds == 100  # a failed job was billed too
    assert job.attempts[0].status is JobStatus.FAILED and job.attempts[0].ended_at is not None
    assert job.errors == [
        Problem(
            code=ErrorCode.UNREADABLE_IMAGE,
            path="20_zqxj dog/img 3.png",
            message="cannot decode image: image file is truncated (18 bytes not processed)",
        )
    ]
    [envelope] = cloud.notifications()
    assert envelope["MessageAttributes"]["status"]["Value"] == "FAILED"


def test_given_completed_job_when_a_late_failure_arrives_then_outcome_kept(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.GENERATING_PREVIEWS)
    run(
        tasks,
        context,
        step("complete", previews={"job_id": JOB_ID, "previews": []}),
    )

    run(
        tasks,
        context,
        step("fail", error={"Error": "States.Timeout", "Cause": ""}),
    )

    job = repository.require(JOB_ID)
    assert (job.status, job.errors) == (JobStatus.COMPLETED, [])


def test_given_preview_timeout_without_cause_when_failed_then_preview_failed(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    job_in(repository, JobStatus.GENERATING_PREVIEWS)
    run(tasks, context, step("fail", error={"Error": "States.Timeout"}))
    [problem] = repository.require(JOB_ID).errors
    assert problem.code is ErrorCode.PREVIEW_FAILED
    assert "States.Timeout" in problem.message


@pytest.mark.parametrize(
    "payload",
    [
        {"action": "train_harder", "job_id": JOB_ID, "attempt": 1},
        {"action": "mark_training"},
        {"action": "mark_training", "job_id": JOB_ID},  # no attempt: a payload of an older definition
        "not an object",
    ],
)
def test_given_malformed_payload_when_invoked_then_bad_request_error(
    tasks: PipelineTasks, context: FakeLambdaContext, payload: Any
) -> None:
    with pytest.raises(Exception) as raised:
        run(tasks, context, payload)
    assert type(raised.value).__name__ == "BAD_REQUEST"
