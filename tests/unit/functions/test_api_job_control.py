"""`POST /jobs/{job_id}/cancel` and `/retry` through the API handler, on the moto cloud; odd job ids and
paths; the job view's attempts and cost."""

from __future__ import annotations

import copy
import json
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from functions_aws import (
    ARTIFACTS_BUCKET,
    DATASET_BUCKET,
    REGION,
    Cloud,
    FakeLambdaContext,
    claim_job,
    load_event,
)
from loraflow_api import app
from loraflow_api.adapters import S3ProgressReader, S3UrlSigner, build_queries
from loraflow_api.logic import JobQueries
from loraflow_api.settings import ApiSettings
from loraflow_ingest.events import DatasetRef, S3Notification, datasets_in
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.control import JobControl
from loraflow_shared.jobs.control_aws import build_control
from loraflow_shared.jobs.model import Attempt, Cost, Job, JobStatus, preview_cancel_key
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier

JOB_ID = "4f1c2a9e0b7d3c5a6e8f1029"
VALIDATION_WARNING = Problem(code=ErrorCode.IGNORED_CONFIG_KEY, path="config.toml", message="xformers")
TRAINING_WARNING = Problem(code=ErrorCode.WEAK_LORA, path="", message="outputs barely changed")
# Ids the API's router passes to the handler: none can be a job id, so none reaches DynamoDB.
ODD_IDS = [
    "ünïcödé-Jöb-名前",
    "a%2Fb",
    "..%2F..%2Fetc%2Fpasswd",
    "x" * 5000,
    " ",
    "%20",
    "null",
    "<img src=x onerror=alert(1)>",
    JOB_ID.upper(),
]
# Characters API Gateway accepts in {job_id} that Powertools' route pattern does not.
UNROUTABLE_IDS = ["😀" * 300, 'a"b', "a\\b", "a`b", "\u200b"]
BODY_LIMIT = 300  # bytes: an error body never grows with the request


def _clients(**overrides: Any) -> dict[str, Any]:
    clients: dict[str, Any] = {
        "stepfunctions": boto3.client("stepfunctions", region_name=REGION),
        "sagemaker": boto3.client("sagemaker", region_name=REGION),
        "s3": boto3.client("s3", region_name=REGION),
        "sqs": boto3.client("sqs", region_name=REGION),
    }
    return clients | overrides


def _control(cloud: Cloud, repository: JobRepository, **clients: Any) -> JobControl:
    notifier = Notifier(boto3.client("sns", region_name=REGION), cloud.topic_arn)
    return build_control(
        repository,
        notifier,
        _clients(**clients),
        cloud.state_machine_arn,
        ARTIFACTS_BUCKET,
        cloud.upload_queue_url,
    )


@pytest.fixture
def repository(cloud: Cloud) -> JobRepository:
    return JobRepository(cloud.table)


@pytest.fixture
def queries(cloud: Cloud) -> JobQueries:
    return build_queries(ApiSettings.from_environ(cloud.env()))


def request(method: str, job_id: str, action: str | None = None) -> dict[str, Any]:
    """An API Gateway proxy event for `/jobs/{job_id}[/action]`."""
    event = copy.deepcopy(load_event("apigw_get_job.json"))
    suffix = f"/{action}" if action else ""
    event.update(
        httpMethod=method,
        path=f"/jobs/{job_id}{suffix}",
        resource="/jobs/{job_id}" + suffix,
        pathParameters={"job_id": job_id},
    )
    event["requestContext"].update(
        httpMethod=method, resourcePath="/jobs/{job_id}" + suffix, path=f"/v1/jobs/{job_id}{suffix}"
    )
    return event


def call(queries: JobQueries, context: FakeLambdaContext, event: dict[str, Any]) -> tuple[int, Any, bytes]:
    response = app.lambda_handler(event, context, queries=queries)
    raw = response["body"].encode()
    return response["statusCode"], json.loads(raw), raw


def job_in(repository: JobRepository, path: list[JobStatus], **fields: Any) -> Job:
    return claim_job(
        repository, JOB_ID, path, dataset_s3_uri=f"s3://{DATASET_BUCKET}/0001-dataset/", **fields
    )


def training_job(cloud: Cloud, repository: JobRepository) -> Job:
    """A validated job whose attempt-1 execution runs (moto keeps it RUNNING), now TRAINING."""
    job = job_in(
        repository,
        [JobStatus.QUEUED],
        config_file="config.toml",
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        validation_warnings=[VALIDATION_WARNING],
        warnings=[VALIDATION_WARNING, TRAINING_WARNING],
    )
    _control(cloud, repository).start_attempt(job)
    return repository.transition(JOB_ID, JobStatus.TRAINING, if_attempt=1)


def executions(cloud: Cloud) -> dict[str, dict[str, Any]]:
    sfn = boto3.client("stepfunctions", region_name=REGION)
    listed = sfn.list_executions(stateMachineArn=cloud.state_machine_arn)["executions"]
    return {e["name"]: dict(sfn.describe_execution(executionArn=e["executionArn"])) for e in listed}


def test_given_training_job_when_cancelled_then_cancelled_execution_aborted_render_told_and_notified_once(
    cloud: Cloud, repository: JobRepository, queries: JobQueries, context: FakeLambdaContext
) -> None:
    training_job(cloud, repository)

    status, body, _ = call(queries, context, request("POST", JOB_ID, "cancel"))

    assert status == 200
    assert (body["job_id"], body["status"]) == (JOB_ID, "CANCELLED")
    assert [e["code"] for e in body["errors"]] == ["CANCELLED"]
    assert [(a["number"], a["status"]) for a in body["attempts"]] == [(1, "CANCELLED")]
    assert body["attempts"][0]["ended_at"] is not None
    assert executions(cloud)[f"{JOB_ID}-1"]["status"] == "ABORTED"
    s3 = boto3.client("s3", region_name=REGION)
    s3.head_object(Bucket=ARTIFACTS_BUCKET, Key=preview_cancel_key(f"{JOB_ID}-1"))  # raises when missing
    [envelope] = cloud.notifications()
    assert envelope["MessageAttributes"]["status"]["Value"] == "CANCELLED"
    assert json.loads(envelope["Message"])["errors"][0]["code"] == "CANCELLED"
    assert repository.require(JOB_ID).notified_at is not None


def test_given_cancelled_job_when_cancelled_again_then_409_conflict_and_nothing_sent(
    cloud: Cloud, repository: JobRepository, queries: JobQueries, context: FakeLambdaContext
) -> None:
    training_job(cloud, repository)
    call(queries, context, request("POST", JOB_ID, "cancel"))
    cloud.notifications()
    before = repository.require(JOB_ID)

    status, body, _ = call(queries, context, request("POST", JOB_ID, "cancel"))

    assert status == 409
    assert body["code"] == "JOB_STATE_CONFLICT"
    assert "CANCELLED" in body["message"]
    assert repository.require(JOB_ID) == before
    assert cloud.notifications() == []


def test_given_completed_job_when_cancelled_then_409_and_job_untouched(
    repository: JobRepository, queries: JobQueries, context: FakeLambdaContext, cloud: Cloud
) -> None:
    path = [JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS, JobStatus.COMPLETED]
    before = job_in(repository, path)

    status, body, _ = call(queries, context, request("POST", JOB_ID, "cancel"))

    assert (status, body["code"]) == (409, "JOB_STATE_CONFLICT")
    assert "COMPLETED" in body["message"]
    assert repository.require(JOB_ID) == before
    assert cloud.notifications() == []


def with_training_jobs(
    cloud: Cloud, repository: JobRepository, names: list[str]
) -> tuple[JobQueries, Stubber]:
    """A TRAINING job that submitted training jobs `names`, and an API whose SageMaker client is stubbed
    (moto 5.2.5 lacks StopTrainingJob: SageMaker's answers are given at the client, the AWS boundary)."""
    job = training_job(cloud, repository)
    repository.update(JOB_ID, attempts=[job.attempts[0].model_copy(update={"training_job_names": names})])
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    s3 = boto3.client("s3", region_name=REGION)
    control = _control(cloud, repository, sagemaker=sagemaker)
    queries = JobQueries(repository, S3UrlSigner(s3, 600), S3ProgressReader(s3, ARTIFACTS_BUCKET), control)
    return queries, Stubber(sagemaker)


def test_given_training_job_with_submitted_training_jobs_when_cancelled_then_each_is_stopped(
    cloud: Cloud, repository: JobRepository, context: FakeLambdaContext
) -> None:
    names = [f"loraflow-{JOB_ID}-1-1", f"loraflow-{JOB_ID}-1-2"]
    queries, stubber = with_training_jobs(cloud, repository, names)
    stubber.add_response("stop_training_job", {}, {"TrainingJobName": names[0]})
    stubber.add_client_error(  # the second already ended: SageMaker refuses, nothing left to stop
        "stop_training_job", "ValidationException", expected_params={"TrainingJobName": names[1]}
    )

    with stubber:
        status, body, _ = call(queries, context, request("POST", JOB_ID, "cancel"))

    stubber.assert_no_pending_responses()
    assert (status, body["status"]) == (200, "CANCELLED")
    assert len(cloud.notifications()) == 1


def test_given_sagemaker_refuses_to_stop_when_cancelled_then_the_cancellation_is_still_announced(
    cloud: Cloud, repository: JobRepository, context: FakeLambdaContext
) -> None:
    queries, stubber = with_training_jobs(cloud, repository, [f"loraflow-{JOB_ID}-1-1"])
    stubber.add_client_error("stop_training_job", "ThrottlingException", http_status_code=400)

    with stubber:
        call(queries, context, request("POST", JOB_ID, "cancel"))
    call(queries, context, request("POST", JOB_ID, "cancel"))  # the user tries again

    assert repository.require(JOB_ID).status is JobStatus.CANCELLED
    assert [json.loads(n["Message"])["status"] for n in cloud.notifications()] == ["CANCELLED"]


def test_given_cancelled_job_when_retried_then_202_attempt_2_queued_with_its_own_execution(
    cloud: Cloud, repository: JobRepository, queries: JobQueries, context: FakeLambdaContext
) -> None:
    training_job(cloud, repository)
    call(queries, context, request("POST", JOB_ID, "cancel"))
    cloud.notifications()

    status, body, _ = call(queries, context, request("POST", JOB_ID, "retry"))

    assert status == 202
    assert (body["status"], body["attempt"], body["errors"]) == ("QUEUED", 2, [])
    assert body["warnings"] == [VALIDATION_WARNING.model_dump(mode="json")]  # the trainer's are gone
    assert [(a["number"], a["status"]) for a in body["attempts"]] == [(1, "CANCELLED"), (2, None)]
    started = executions(cloud)
    assert started[f"{JOB_ID}-1"]["status"] == "ABORTED"
    second = started[f"{JOB_ID}-2"]
    assert second["status"] == "RUNNING"
    assert json.loads(second["input"])["attempt"] == 2
    assert json.loads(second["input"])["job_id"] == JOB_ID
    job = repository.require(JOB_ID)
    assert job.execution_arn == second["executionArn"] == job.attempts[1].execution_arn
    assert (job.notified_at, job.preview_task_token) == (None, None)
    assert cloud.notifications() == []  # a new attempt is no terminal state


@pytest.mark.parametrize("path", [[JobStatus.QUEUED], [JobStatus.QUEUED, JobStatus.TRAINING]])
def test_given_unfinished_job_when_retried_then_409_and_no_execution(
    cloud: Cloud,
    repository: JobRepository,
    queries: JobQueries,
    context: FakeLambdaContext,
    path: list[JobStatus],
) -> None:
    before = job_in(repository, path, config_file="config.toml", base_model="m")

    status, body, _ = call(queries, context, request("POST", JOB_ID, "retry"))

    assert (status, body["code"]) == (409, "JOB_STATE_CONFLICT")
    assert path[-1].value in body["message"]
    assert repository.require(JOB_ID) == before
    assert executions(cloud) == {}


def test_given_job_failed_before_validation_ended_when_retried_then_validating_and_ingest_asked_again(
    cloud: Cloud, repository: JobRepository, queries: JobQueries, context: FakeLambdaContext
) -> None:
    dataset = "0002 my+set é"
    now = repository.now()
    repository.claim(
        Job(
            job_id=JOB_ID,
            dataset=dataset,
            status=JobStatus.VALIDATING,
            created_at=now,
            updated_at=now,
            fingerprint="f" * 64,
            dataset_s3_uri=f"s3://{DATASET_BUCKET}/{dataset}/",
        )
    )
    crash = Problem(code=ErrorCode.INTERNAL_ERROR, path="", message="ingest failed unexpectedly")
    repository.transition(JOB_ID, JobStatus.FAILED, errors=[crash])

    status, body, _ = call(queries, context, request("POST", JOB_ID, "retry"))

    assert status == 202
    assert (body["status"], body["attempt"], body["errors"]) == ("VALIDATING", 2, [])
    sqs = boto3.client("sqs", region_name=REGION)
    [message] = sqs.receive_message(QueueUrl=cloud.upload_queue_url, MaxNumberOfMessages=10)["Messages"]
    notification = S3Notification.model_validate_json(message["Body"])
    assert datasets_in(notification) == ({DatasetRef(DATASET_BUCKET, dataset)}, [])
    assert executions(cloud) == {}  # ingest starts it once the dataset validated


ROUTES = [("GET", None), ("POST", "cancel"), ("POST", "retry")]


@pytest.mark.parametrize(("method", "action"), ROUTES)
def test_given_odd_job_ids_when_requested_then_404_job_not_found_with_a_short_body(
    cloud: Cloud, queries: JobQueries, context: FakeLambdaContext, method: str, action: str | None
) -> None:
    for job_id in ODD_IDS:
        status, body, raw = call(queries, context, request(method, job_id, action))

        assert (status, body["code"]) == (404, "JOB_NOT_FOUND"), job_id[:80]
        assert len(raw) < BODY_LIMIT, raw[:400]
    assert cloud.table.scan()["Items"] == []


def test_given_ever_longer_non_ascii_job_id_when_requested_then_the_404_body_stops_growing(
    queries: JobQueries, context: FakeLambdaContext
) -> None:
    for method, action in ROUTES:
        sizes = set()
        for length in (5_000, 50_000):
            status, body, raw = call(queries, context, request(method, "é" * length, action))
            assert (status, body["code"]) == (404, "JOB_NOT_FOUND")
            sizes.add(len(raw))

        # 64 characters are echoed; JSON escapes each é as \u00e9, so ~450 bytes rather than under 300.
        [size] = sizes
        assert size < 1024, (method, action, size)


def test_given_unknown_route_or_unroutable_id_when_called_then_404_with_a_bounded_body(
    queries: JobQueries, context: FakeLambdaContext
) -> None:
    events = [request("DELETE", JOB_ID + "/" + "deep/" * 4000)]
    events += [request("GET", job_id) for job_id in UNROUTABLE_IDS]
    for event in events:
        status, body, raw = call(queries, context, event)

        assert status == 404
        # An unknown route names the path; an id Powertools cannot route is an unknown job all the same.
        expected = "no route" if event["httpMethod"] == "DELETE" else "no job with id"
        assert body["message"].startswith(expected)
        # 100 characters of the path are echoed; JSON writes an emoji as 12 bytes (\ud83d\ude00).
        assert len(raw) < 2048, raw[:400]


def test_given_job_id_outside_powertools_route_pattern_when_fetched_then_job_not_found(
    queries: JobQueries, context: FakeLambdaContext
) -> None:
    codes = {job_id: call(queries, context, request("GET", job_id))[1]["code"] for job_id in UNROUTABLE_IDS}
    assert set(codes.values()) == {"JOB_NOT_FOUND"}, codes


def test_given_job_with_two_attempts_when_fetched_then_view_has_attempts_and_total_cost(
    repository: JobRepository, queries: JobQueries, context: FakeLambdaContext
) -> None:
    def cost(usd: float, seconds: int) -> Cost:
        return Cost(
            instance_type="ml.g5.2xlarge",
            instance_count=1,
            training_seconds=seconds,
            billable_seconds=seconds,
            spot=False,
            price_per_hour_usd=1.515,
            estimated_usd=usd,
        )

    job_in(repository, [JobStatus.QUEUED, JobStatus.TRAINING])
    first = Attempt(
        number=1,
        execution_name=f"{JOB_ID}-1",
        started_at="2025-01-15T10:00:00.000Z",
        training_job_names=[f"loraflow-{JOB_ID}-1-1", f"loraflow-{JOB_ID}-1-2"],
        capacity_retries=1,
        status=JobStatus.FAILED,
        ended_at="2025-01-15T11:00:00.000Z",
        cost=cost(0.2525, 600),
    )
    second = Attempt(
        number=2,
        execution_name=f"{JOB_ID}-2",
        started_at="2025-01-15T12:00:00.000Z",
        training_job_names=[f"loraflow-{JOB_ID}-2-1"],
        waiting_reason="ResourceLimitExceeded: quota",
        cost=cost(0.101, 240),
    )
    repository.update(JOB_ID, attempt=2, attempts=[first, second], cost=second.cost)

    status, body, _ = call(queries, context, request("GET", JOB_ID))

    assert status == 200
    assert body["attempt"] == 2
    assert [a["number"] for a in body["attempts"]] == [1, 2]
    assert body["attempts"][0]["training_job_names"] == first.training_job_names
    assert body["attempts"][1]["waiting_reason"] == "ResourceLimitExceeded: quota"
    assert body["cost"]["estimated_usd"] == 0.101
    assert body["total_estimated_usd"] == pytest.approx(0.3535)
