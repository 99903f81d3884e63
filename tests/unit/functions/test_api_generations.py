"""`POST /jobs/{job_id}/generations` and `GET /jobs/{job_id}/generations/{generation_id}` through the API
handler with its own adapters, on moto: validation, 404/409/429, the request the endpoint gets, the
job's view."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from functions_aws import (
    ARTIFACTS_BUCKET,
    DATASET_BUCKET,
    ENDPOINT_NAME,
    LARGE_MODEL_ENDPOINT_NAME,
    REGION,
    Cloud,
    FakeLambdaContext,
    claim_job,
    load_event,
    sent_requests,
)
from loraflow_api import app
from loraflow_api.adapters import AsyncRenderSubmitter, build_generations, build_queries
from loraflow_api.generations import Generations
from loraflow_api.logic import JobQueries
from loraflow_api.settings import ApiSettings
from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.jobs.async_inference_aws import SageMakerAsyncEndpoints
from loraflow_shared.jobs.generations import MAX_PENDING_GENERATIONS
from loraflow_shared.jobs.model import (
    Artifacts,
    GenerationStatus,
    Job,
    JobStatus,
    PreviewSettings,
    generation_inference_id,
    preview_request_key,
    timestamp,
)
from loraflow_shared.jobs.preview_timing import GENERATION_EXPIRY_S, GENERATION_TIMEOUTS
from loraflow_shared.jobs.repository import JobRepository

JOB_ID = "4f1c2a9e0b7d3c5a6e8f1029"
LORA_URI = f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}/lora/pytorch_lora_weights.safetensors"
BASE_MODEL = "s3://loraflow-artifacts/base-models/tiny-sd/"
PREVIEW = PreviewSettings(prompts=["zqxj dog"], steps=3, resolution=64, seed=5, clip_skip=2)
COMPLETED_PATH = [JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS, JobStatus.COMPLETED]
NOW = datetime.now(UTC).replace(microsecond=0)  # the job view reads the real clock


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def invocations(cloud: Cloud) -> Iterator[list[dict[str, Any]]]:
    """InvokeEndpointAsync requests as they leave boto3 (moto keeps neither the id nor the timeouts)."""
    with sent_requests("sagemaker-runtime.InvokeEndpointAsync") as sent:
        yield sent


@pytest.fixture
def settings(cloud: Cloud) -> ApiSettings:
    return ApiSettings.from_environ(cloud.env())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def generations(settings: ApiSettings, invocations: list[dict[str, Any]], clock: Clock) -> Generations:
    built = build_generations(settings)
    built._clock = clock  # the same adapters, a clock the test moves
    return built


@pytest.fixture
def queries(settings: ApiSettings) -> JobQueries:
    return build_queries(settings)


def job_in(repository: JobRepository, path: list[JobStatus], **fields: Any) -> Job:
    defaults: dict[str, Any] = {
        "dataset_s3_uri": f"s3://{DATASET_BUCKET}/0001-dataset/",
        "base_model": BASE_MODEL,
        "preview": PREVIEW,
    }
    if JobStatus.COMPLETED in path:
        defaults["artifacts"] = Artifacts(
            lora_diffusers_s3_uri=LORA_URI, training_report_s3_uri=f"s3://{ARTIFACTS_BUCKET}/r.json"
        )
    return claim_job(repository, JOB_ID, path, **(defaults | fields))


def post(body: Any, job_id: str = JOB_ID) -> dict[str, Any]:
    event = copy.deepcopy(load_event("apigw_create_generation.json"))
    event.update(
        path=f"/jobs/{job_id}/generations",
        pathParameters={"job_id": job_id},
        body=body if isinstance(body, str) else json.dumps(body),
    )
    return event


def get(generation_id: str, job_id: str = JOB_ID) -> dict[str, Any]:
    event = copy.deepcopy(load_event("apigw_get_job.json"))
    path = f"/jobs/{job_id}/generations/{generation_id}"
    event.update(
        path=path,
        resource="/jobs/{job_id}/generations/{generation_id}",
        pathParameters={"job_id": job_id, "generation_id": generation_id},
    )
    event["requestContext"].update(
        resourcePath="/jobs/{job_id}/generations/{generation_id}", path=f"/v1{path}"
    )
    return event


def call(
    queries: JobQueries, generations: Generations, context: FakeLambdaContext, event: dict[str, Any]
) -> tuple[int, Any]:
    response = app.lambda_handler(event, context, queries=queries, generations=generations)
    return response["statusCode"], json.loads(response["body"])


@pytest.fixture
def api(queries: JobQueries, generations: Generations, context: FakeLambdaContext) -> Any:
    return lambda event: call(queries, generations, context, event)


def read_request(inference: str) -> PreviewRequest:
    body = boto3.client("s3", region_name=REGION).get_object(
        Bucket=ARTIFACTS_BUCKET, Key=preview_request_key(inference)
    )["Body"]
    return PreviewRequest.model_validate_json(body.read())


def test_given_completed_job_when_generation_posted_then_202_pending_and_endpoint_asked_for_lora_only(
    api: Any, repository: JobRepository, invocations: list[dict[str, Any]]
) -> None:
    job_in(repository, COMPLETED_PATH)

    status, body = api(load_event("apigw_create_generation.json"))

    assert status == 202
    assert body["status"] == "PENDING" and body["job_id"] == JOB_ID
    assert body["prompts"] == ["zqxj dog on a beach", "zqxj dog in the snow"]
    assert body["settings"] == {
        "steps": 4,
        "resolution": 64,  # the job's previews'
        "seed": 7,
        "lora_scale": 0.8,
        "negative_prompt": None,
        "guidance": None,
        "clip_skip": 2,
    }
    assert (body["images"], body["error"]) == ([], None)
    inference = generation_inference_id(JOB_ID, body["generation_id"])
    [invocation] = invocations
    assert (invocation["EndpointName"], invocation["InferenceId"]) == (ENDPOINT_NAME, inference)
    assert invocation["InputLocation"] == f"s3://{ARTIFACTS_BUCKET}/{preview_request_key(inference)}"
    assert invocation["RequestTTLSeconds"] == GENERATION_TIMEOUTS.request_ttl_s
    request = read_request(inference)
    assert (request.render_base, request.lora_scale, request.lora_s3_uri) == (False, 0.8, LORA_URI)
    assert (request.base_model, request.steps, request.seed, request.clip_skip) == (BASE_MODEL, 4, 7, 2)
    assert request.output_s3_prefix == (
        f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}/generations/{body['generation_id']}/"
    )
    assert request.cancel_s3_uri is None


def test_given_large_model_job_when_generation_posted_then_the_large_endpoint(
    api: Any, repository: JobRepository, invocations: list[dict[str, Any]]
) -> None:
    job_in(repository, COMPLETED_PATH, compute="large")

    status, _ = api(post({"prompts": ["zqxj dog"]}))

    assert status == 202
    assert [invocation["EndpointName"] for invocation in invocations] == [LARGE_MODEL_ENDPOINT_NAME]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompts": ["a"], "stpes": 4}, "stpes: unknown key (known: prompts, steps, seed, lora_scale"),
        ("{not json", "the body is not JSON"),
        ({"prompts": ["a"] * 8, "steps": 150, "resolution": 2048}, "estimated at 5033 s of rendering"),
    ],
    ids=["unknown-key", "not-json", "over-budget"],
)
def test_given_bad_body_when_generation_posted_then_400_naming_the_problem_and_nothing_recorded(
    api: Any, repository: JobRepository, invocations: list[dict[str, Any]], body: Any, expected: str
) -> None:
    job_in(repository, COMPLETED_PATH)

    status, answer = api(post(body))

    assert (status, answer["code"]) == (400, "BAD_REQUEST")
    assert expected in answer["message"]
    assert repository.require(JOB_ID).generations == [] and invocations == []


@pytest.mark.parametrize(
    "path",
    [[JobStatus.QUEUED, JobStatus.TRAINING], [JobStatus.QUEUED, JobStatus.FAILED], [JobStatus.REJECTED]],
    ids=["TRAINING", "FAILED", "REJECTED"],
)
def test_given_job_not_completed_when_generation_posted_then_409(
    api: Any, repository: JobRepository, invocations: list[dict[str, Any]], path: list[JobStatus]
) -> None:
    job_in(repository, path)

    status, answer = api(post({"prompts": ["zqxj dog"]}))

    assert (status, answer["code"]) == (409, "JOB_STATE_CONFLICT")
    assert answer["message"] == (
        f"job {JOB_ID} is {path[-1].value}: only COMPLETED jobs can be used to generate"
    )
    assert invocations == []


@pytest.mark.parametrize("job_id", ["0" * 24, "not-a-job"])
def test_given_unknown_job_when_generation_posted_or_read_then_404(api: Any, job_id: str) -> None:
    for event in (post({"prompts": ["a"]}, job_id), get("0123456789abcdef", job_id)):
        status, answer = api(event)

        assert (status, answer["code"]) == (404, "JOB_NOT_FOUND")


def test_given_full_pending_generations_when_another_posted_then_429_until_one_ends_or_expires(
    api: Any, repository: JobRepository, invocations: list[dict[str, Any]], clock: Clock
) -> None:
    job_in(repository, COMPLETED_PATH)
    for _ in range(MAX_PENDING_GENERATIONS):
        assert api(post({"prompts": ["zqxj dog"]}))[0] == 202

    status, answer = api(post({"prompts": ["zqxj dog"]}))

    assert (status, answer["code"]) == (429, "TOO_MANY_GENERATIONS")
    assert f"already has {MAX_PENDING_GENERATIONS} generations waiting" in answer["message"]
    assert len(invocations) == MAX_PENDING_GENERATIONS
    clock.now += timedelta(seconds=GENERATION_EXPIRY_S + 1)  # their results can no longer come
    assert api(post({"prompts": ["zqxj dog"]}))[0] == 202


def test_given_generations_when_job_and_generation_read_then_listed_newest_first_and_unknown_ids_404(
    api: Any, repository: JobRepository, clock: Clock
) -> None:
    job_in(repository, COMPLETED_PATH)
    first = api(post({"prompts": ["zqxj dog"]}))[1]
    clock.now += timedelta(seconds=1)
    second = api(post({"prompts": ["zqxj cat"], "negative_prompt": "blurry"}))[1]

    _, job = api(load_event("apigw_get_job.json"))
    status, read = api(get(second["generation_id"]))

    assert [g["generation_id"] for g in job["generations"]] == [
        second["generation_id"],
        first["generation_id"],
    ]
    assert job["generations"][0] == {
        "generation_id": second["generation_id"],
        "status": "PENDING",
        "created_at": timestamp(NOW + timedelta(seconds=1)),
    }
    assert (status, read) == (200, second)
    for unknown in ("f" * 16, "no-such-id", first["generation_id"].upper()):
        status, answer = api(get(unknown))
        assert (status, answer["code"]) == (404, "GENERATION_NOT_FOUND")


def test_given_expired_pending_generation_when_read_then_failed_with_the_reason(
    api: Any, repository: JobRepository, clock: Clock
) -> None:
    job_in(repository, COMPLETED_PATH)
    generation_id = api(post({"prompts": ["zqxj dog"]}))[1]["generation_id"]
    clock.now += timedelta(seconds=GENERATION_EXPIRY_S + 1)

    _, read = api(get(generation_id))

    assert read["status"] == "FAILED"
    assert read["error"]["code"] == "PREVIEW_FAILED" and str(GENERATION_EXPIRY_S) in read["error"]["message"]


def test_given_endpoint_refusing_when_generation_posted_then_recorded_failed_and_500_with_reason(
    settings: ApiSettings, repository: JobRepository, queries: JobQueries, context: FakeLambdaContext
) -> None:
    job_in(repository, COMPLETED_PATH)
    runtime = boto3.client("sagemaker-runtime", region_name=REGION)
    generations = build_generations(settings)
    generations._submitter = AsyncRenderSubmitter(
        boto3.client("s3", region_name=REGION), SageMakerAsyncEndpoints(runtime), ARTIFACTS_BUCKET
    )
    with Stubber(runtime) as stub:
        stub.add_client_error("invoke_endpoint_async", "ThrottlingException", "Rate exceeded")
        status, answer = call(queries, generations, context, post({"prompts": ["zqxj dog"]}))

    assert (status, answer["code"]) == (500, "PREVIEW_FAILED")
    assert "did not take the request" in answer["message"] and "Rate exceeded" in answer["message"]
    [generation] = repository.require(JOB_ID).generations
    assert generation.status is GenerationStatus.FAILED
    assert generation.error is not None and "Rate exceeded" in generation.error.message


def test_given_submitter_failing_unexpectedly_when_generation_posted_then_recorded_failed_not_left_pending(
    settings: ApiSettings, repository: JobRepository, queries: JobQueries, context: FakeLambdaContext
) -> None:
    job_in(repository, COMPLETED_PATH)
    generations = build_generations(settings)
    s3 = boto3.client("s3", region_name=REGION)
    # An S3 client on a bucket that does not exist: the request JSON cannot be written.
    generations._submitter = AsyncRenderSubmitter(
        s3, SageMakerAsyncEndpoints(boto3.client("sagemaker-runtime", region_name=REGION)), "no-such-bucket"
    )

    status, answer = call(queries, generations, context, post({"prompts": ["zqxj dog"]}))

    assert status == 500 and answer["code"] in ("INTERNAL_ERROR", "PREVIEW_FAILED")
    [generation] = repository.require(JOB_ID).generations
    assert generation.status is GenerationStatus.FAILED and generation.error is not None


def test_given_deployed_handler_when_cold_started_then_jobs_and_generations_from_its_environment(
    cloud: Cloud, repository: JobRepository, context: FakeLambdaContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_in(repository, COMPLETED_PATH)
    for name, value in cloud.env().items():
        monkeypatch.setenv(name, value)
    app.default_queries.cache_clear()
    app.default_generations.cache_clear()
    try:
        job = app.lambda_handler(load_event("apigw_get_job.json"), context)  # the cold start reads both
        for name in cloud.env():  # as the local cloud does after a cold start
            monkeypatch.delenv(name)
        created = app.lambda_handler(post({"prompts": ["zqxj dog"]}), context)
        read = app.lambda_handler(get(json.loads(created["body"])["generation_id"]), context)
    finally:
        app.default_queries.cache_clear()
        app.default_generations.cache_clear()

    assert (job["statusCode"], created["statusCode"], read["statusCode"]) == (200, 202, 200)
