"""The preview callback records a generation's outcome on its job (the endpoint's notifications for a
`<job_id>-g-<generation_id>` InferenceId): pictures when it succeeded, the reason when it failed; a
duplicate, late or foreign notification changes nothing."""

from __future__ import annotations

import copy
import json
from typing import Any

import boto3
import pytest
from functions_aws import (
    ARTIFACTS_BUCKET,
    DATASET_BUCKET,
    REGION,
    Cloud,
    FakeLambdaContext,
    claim_job,
    load_event,
)
from loraflow_callback import app
from loraflow_callback.adapters import build_callback
from loraflow_callback.events import AsyncInferenceNotification
from loraflow_callback.logic import Outcome, PreviewCallback
from loraflow_callback.settings import CallbackSettings
from loraflow_shared.errors import ErrorCode
from loraflow_shared.jobs.generations import GenerationRequest, generation_settings, pending_generation
from loraflow_shared.jobs.model import (
    Artifacts,
    Generation,
    GenerationStatus,
    JobStatus,
    PreviewSettings,
    generation_inference_id,
    new_generation_id,
)
from loraflow_shared.jobs.repository import JobRepository

JOB_ID = "4f1c2a9e0b7d3c5a6e8f1029"
COMPLETED_PATH = [JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS, JobStatus.COMPLETED]
PROMPTS = ["zqxj dog on a beach", "zqxj dog in the snow"]


@pytest.fixture
def callback(cloud: Cloud) -> PreviewCallback:
    return build_callback(CallbackSettings.from_environ(cloud.env()))


@pytest.fixture
def pending(repository: JobRepository) -> Generation:
    """A COMPLETED job with one PENDING generation, as the API records it."""
    job = claim_job(
        repository,
        JOB_ID,
        COMPLETED_PATH,
        dataset_s3_uri=f"s3://{DATASET_BUCKET}/0001-dataset/",
        base_model="s3://loraflow-artifacts/base-models/tiny-sd/",
        preview=PreviewSettings(prompts=["p"], steps=3, resolution=64, seed=5),
        artifacts=Artifacts(lora_diffusers_s3_uri="s3://a/l.safetensors", training_report_s3_uri="s3://a/r"),
    )
    request = GenerationRequest.model_validate({"prompts": PROMPTS})
    generation = pending_generation(
        new_generation_id(), request, generation_settings(job, request), repository._clock()
    )
    repository.change_generations(JOB_ID, lambda current: [generation])
    return generation


def notification(event_name: str, inference: str) -> dict[str, Any]:
    """The endpoint's notification fixture, for `inference`, with its output/failure file names."""
    event = copy.deepcopy(load_event(event_name))
    message = json.loads(event["Records"][0]["Sns"]["Message"])
    message["inferenceId"] = inference
    for field, suffix in (("outputLocation", ".out"), ("failureLocation", "-error.out")):
        if field in message.get("responseParameters", {}):
            folder = "responses" if suffix == ".out" else "failures"
            message["responseParameters"][field] = (
                f"s3://{ARTIFACTS_BUCKET}/async-inference/{folder}/{inference}{suffix}"
            )
    event["Records"][0]["Sns"]["Message"] = json.dumps(message)
    return event


def put_file(event: dict[str, Any], field: str, body: str) -> None:
    location = json.loads(event["Records"][0]["Sns"]["Message"])["responseParameters"][field]
    bucket, _, key = location.removeprefix("s3://").partition("/")
    boto3.client("s3", region_name=REGION).put_object(Bucket=bucket, Key=key, Body=body.encode())


def parsed(event: dict[str, Any]) -> AsyncInferenceNotification:
    return AsyncInferenceNotification.model_validate_json(event["Records"][0]["Sns"]["Message"])


def rendered(generation: Generation, job_id: str = JOB_ID) -> str:
    prefix = f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}/generations/{generation.generation_id}/"
    previews = [{"prompt": prompt, "s3_uri": f"{prefix}{i}.png"} for i, prompt in enumerate(PROMPTS)]
    return json.dumps({"job_id": job_id, "previews": previews})


def test_given_pending_generation_when_success_notified_then_completed_with_its_pictures(
    callback: PreviewCallback, pending: Generation, repository: JobRepository, context: FakeLambdaContext
) -> None:
    event = notification(
        "sns_async_inference_success.json", generation_inference_id(JOB_ID, pending.generation_id)
    )
    put_file(event, "outputLocation", rendered(pending))

    app.lambda_handler(event, context, callback=callback)

    job = repository.require(JOB_ID)
    [generation] = job.generations
    assert generation.status is GenerationStatus.COMPLETED and generation.error is None
    assert [(image.prompt, image.s3_uri.rsplit("/", 1)[-1]) for image in generation.images] == [
        (PROMPTS[0], "0.png"),
        (PROMPTS[1], "1.png"),
    ]
    assert job.status is JobStatus.COMPLETED  # the job itself is untouched


def test_given_pending_generation_when_failure_notified_then_failed_with_the_server_reason(
    callback: PreviewCallback, pending: Generation, repository: JobRepository, context: FakeLambdaContext
) -> None:
    event = notification(
        "sns_async_inference_failure.json", generation_inference_id(JOB_ID, pending.generation_id)
    )
    put_file(
        event,
        "failureLocation",
        json.dumps({"code": "PREVIEW_FAILED", "message": "FluxPipeline takes no negative prompt"}),
    )

    app.lambda_handler(event, context, callback=callback)

    [generation] = repository.require(JOB_ID).generations
    assert generation.status is GenerationStatus.FAILED and generation.images == []
    assert generation.error is not None
    assert (generation.error.code, generation.error.message) == (
        ErrorCode.PREVIEW_FAILED,
        "FluxPipeline takes no negative prompt",
    )


def test_given_recorded_generation_when_notified_again_then_nothing_changes(
    callback: PreviewCallback, pending: Generation, repository: JobRepository
) -> None:
    inference = generation_inference_id(JOB_ID, pending.generation_id)
    succeeded = notification("sns_async_inference_success.json", inference)
    put_file(succeeded, "outputLocation", rendered(pending))
    first = callback.handle(parsed(succeeded))
    recorded = repository.require(JOB_ID)

    again = callback.handle(parsed(succeeded))
    late_failure = callback.handle(parsed(notification("sns_async_inference_failure.json", inference)))

    assert (first, again, late_failure) == (
        Outcome.SUCCEEDED,
        Outcome.ALREADY_RECORDED,
        Outcome.ALREADY_RECORDED,
    )
    assert repository.require(JOB_ID) == recorded


def test_given_foreign_or_unknown_generation_when_notified_then_dropped(
    callback: PreviewCallback, pending: Generation, repository: JobRepository
) -> None:
    unknown = notification("sns_async_inference_success.json", generation_inference_id(JOB_ID, "0" * 16))
    other_job = notification(
        "sns_async_inference_success.json", generation_inference_id("0" * 24, pending.generation_id)
    )

    assert callback.handle(parsed(unknown)) is Outcome.UNKNOWN_GENERATION
    assert callback.handle(parsed(other_job)) is Outcome.UNKNOWN_JOB
    assert repository.require(JOB_ID).generations == [pending]


def test_given_response_for_another_job_when_success_notified_then_failed(
    callback: PreviewCallback, pending: Generation, repository: JobRepository
) -> None:
    event = notification(
        "sns_async_inference_success.json", generation_inference_id(JOB_ID, pending.generation_id)
    )
    put_file(event, "outputLocation", rendered(pending, job_id="0" * 24))

    assert callback.handle(parsed(event)) is Outcome.FAILED
    [generation] = repository.require(JOB_ID).generations
    assert generation.error is not None and "is for job 000" in generation.error.message


def test_given_unprocessable_notification_in_failure_queue_when_handled_then_generation_failed(
    callback: PreviewCallback, pending: Generation, repository: JobRepository, context: FakeLambdaContext
) -> None:
    event = notification(
        "sns_async_inference_success.json", generation_inference_id(JOB_ID, pending.generation_id)
    )
    record = {"requestPayload": event, "responsePayload": {"errorType": "Boom", "errorMessage": "no table"}}
    queue_event = {"Records": [{"eventSource": "aws:sqs", "messageId": "m1", "body": json.dumps(record)}]}

    result = app.lambda_handler(queue_event, context, callback=callback)

    assert result == {"batchItemFailures": []}
    [generation] = repository.require(JOB_ID).generations
    assert generation.status is GenerationStatus.FAILED
    assert generation.error is not None and "Boom: no table" in generation.error.message
