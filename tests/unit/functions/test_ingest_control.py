"""Ingest and job control: a newer dataset version supersedes the older job, a version that comes back
runs again, an unexpected error fails the claimed job (no redelivery), a deletion is a new version."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from botocore.stub import Stubber
from functions_aws import (
    ARTIFACTS_BUCKET,
    DATASET_BUCKET,
    DEFAULT_BASE_MODEL,
    REGION,
    Cloud,
    FakeLambdaContext,
    load_event,
    png,
    upload_dataset,
    valid_dataset_files,
)
from loraflow_api.adapters import build_queries
from loraflow_api.settings import ApiSettings
from loraflow_ingest import app
from loraflow_ingest.adapters import S3DatasetStore, SecretTokenHubResolver
from loraflow_ingest.logic import DatasetStore, Ingestor
from loraflow_shared.dataset.objects import ObjectInfo, ObjectReader
from loraflow_shared.errors import ErrorCode
from loraflow_shared.jobs.control import JobControl, cancelled_by_user
from loraflow_shared.jobs.control_aws import build_control
from loraflow_shared.jobs.model import Job, JobStatus, dataset_fingerprint, job_id_for
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier

DATASET = "0001-dataset"
ADDED = f"{DATASET}/20_zqxj dog/img 3.png"
Ingest = Callable[[dict[str, Any]], dict[str, Any]]


def s3_event(*keys: str, event_name: str = "ObjectCreated:Put") -> dict[str, Any]:
    """The upload queue's SQS batch: one S3 event per key, keys `quote_plus`-encoded as S3 sends them."""
    template = load_event("s3_put_in_sqs.json")["Records"][0]
    records = []
    for index, key in enumerate(keys):
        record = copy.deepcopy(template)
        body = json.loads(record["body"])
        s3_record = body["Records"][0]
        s3_record["eventName"] = event_name
        s3_record["s3"]["object"]["key"] = quote_plus(key, safe="/")
        if event_name.startswith("ObjectRemoved"):  # a deletion names no size or ETag
            s3_record["s3"]["object"] = {"key": s3_record["s3"]["object"]["key"], "sequencer": "0055AED6DC"}
        record["body"] = json.dumps(body)
        record["messageId"] = f"message-{index}"
        records.append(record)
    return {"Records": records}


def _control(cloud: Cloud, repository: JobRepository, **clients: Any) -> JobControl:
    defaults: dict[str, Any] = {
        "stepfunctions": boto3.client("stepfunctions", region_name=REGION),
        "sagemaker": boto3.client("sagemaker", region_name=REGION),
        "s3": boto3.client("s3", region_name=REGION),
    }
    notifier = Notifier(boto3.client("sns", region_name=REGION), cloud.topic_arn)
    return build_control(repository, notifier, defaults | clients, cloud.state_machine_arn, ARTIFACTS_BUCKET)


def make_ingest(
    cloud: Cloud,
    context: FakeLambdaContext,
    store: Callable[[DatasetStore], DatasetStore] = lambda store: store,
    **clients: Any,
) -> Ingest:
    """The ingest handler with the function's adapters; `store` may wrap the dataset store."""
    repository = JobRepository(cloud.table)
    ingestor = Ingestor(
        repository=repository,
        notifier=Notifier(boto3.client("sns", region_name=REGION), cloud.topic_arn),
        store=store(S3DatasetStore(boto3.client("s3", region_name=REGION))),
        control=_control(cloud, repository, **clients),
        settle_seconds=0,
        default_base_model=DEFAULT_BASE_MODEL,
        hub=SecretTokenHubResolver("", lambda uri: None, ARTIFACTS_BUCKET),
    )
    return lambda event: app.lambda_handler(event, context, ingestor=ingestor)


@pytest.fixture
def ingest(cloud: Cloud, context: FakeLambdaContext) -> Ingest:
    return make_ingest(cloud, context)


@pytest.fixture
def repository(cloud: Cloud) -> JobRepository:
    return JobRepository(cloud.table)


def executions(cloud: Cloud) -> dict[str, dict[str, Any]]:
    sfn = boto3.client("stepfunctions", region_name=REGION)
    listed = sfn.list_executions(stateMachineArn=cloud.state_machine_arn)["executions"]
    return {e["name"]: dict(sfn.describe_execution(executionArn=e["executionArn"])) for e in listed}


def announced(cloud: Cloud) -> list[dict[str, Any]]:
    return [json.loads(envelope["Message"]) for envelope in cloud.notifications()]


def current_job_id() -> str:
    """The job id of the dataset's content as it is now."""
    listed = S3DatasetStore(boto3.client("s3", region_name=REGION)).list_objects(
        DATASET_BUCKET, f"{DATASET}/"
    )
    return job_id_for(DATASET, dataset_fingerprint(listed))


def two_versions(cloud: Cloud, ingest: Ingest) -> tuple[str, str]:
    """Version 1 ingested (queued, started), then an image added and version 2 ingested."""
    upload_dataset(DATASET, valid_dataset_files())
    ingest(s3_event(f"{DATASET}/config.toml"))
    first = current_job_id()
    upload_dataset(DATASET, {"20_zqxj dog/img 3.png": png(3)})
    assert ingest(s3_event(ADDED)) == {"batchItemFailures": []}
    return first, current_job_id()


def test_given_queued_job_when_a_newer_version_is_ingested_then_older_superseded_and_newer_queued(
    cloud: Cloud, repository: JobRepository, ingest: Ingest
) -> None:
    first, second = two_versions(cloud, ingest)

    older, newer = repository.require(first), repository.require(second)
    assert first != second
    assert older.status is JobStatus.CANCELLED
    [reason] = older.errors
    assert reason.code is ErrorCode.SUPERSEDED and second in reason.message
    assert older.attempts[0].status is JobStatus.CANCELLED
    assert (newer.status, newer.attempt) == (JobStatus.QUEUED, 1)
    started = executions(cloud)
    assert started[f"{first}-1"]["status"] == "ABORTED"
    assert started[f"{second}-1"]["status"] == "RUNNING"
    [notice] = announced(cloud)
    assert (notice["job_id"], notice["status"]) == (first, "CANCELLED")
    assert notice["errors"][0]["code"] == "SUPERSEDED" and second in notice["errors"][0]["message"]


def test_given_superseded_version_when_the_dataset_reverts_to_it_then_it_runs_again_and_supersedes_the_newer(
    cloud: Cloud, repository: JobRepository, ingest: Ingest
) -> None:
    first, second = two_versions(cloud, ingest)
    announced(cloud)
    boto3.client("s3", region_name=REGION).delete_object(Bucket=DATASET_BUCKET, Key=ADDED)

    response = ingest(s3_event(ADDED, event_name="ObjectRemoved:Delete"))

    assert response == {"batchItemFailures": []}
    assert current_job_id() == first
    revived, newer = repository.require(first), repository.require(second)
    assert (revived.status, revived.attempt, revived.errors) == (JobStatus.QUEUED, 2, [])
    assert [(a.number, a.status) for a in revived.attempts] == [(1, JobStatus.CANCELLED), (2, None)]
    assert newer.status is JobStatus.CANCELLED
    assert newer.errors[0].code is ErrorCode.SUPERSEDED and first in newer.errors[0].message
    started = executions(cloud)
    assert started[f"{first}-2"]["status"] == "RUNNING"
    assert json.loads(started[f"{first}-2"]["input"])["attempt"] == 2
    assert revived.execution_arn == started[f"{first}-2"]["executionArn"]
    assert started[f"{second}-1"]["status"] == "ABORTED"
    assert [(n["job_id"], n["status"]) for n in announced(cloud)] == [(second, "CANCELLED")]


class ReaderFails:
    """A dataset store whose listing works but whose reads fail (an S3 outage mid-validation)."""

    def __init__(self, inner: DatasetStore) -> None:
        self._inner = inner

    def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        return self._inner.list_objects(bucket, prefix)

    def reader(self, bucket: str) -> ObjectReader:
        raise ConnectionResetError("connection reset by peer while reading the dataset")


def test_given_unexpected_error_during_validation_when_ingested_then_job_failed_notified_and_not_redelivered(
    cloud: Cloud, repository: JobRepository, context: FakeLambdaContext
) -> None:
    ingest = make_ingest(cloud, context, store=ReaderFails)
    upload_dataset(DATASET, valid_dataset_files())

    first = ingest(s3_event(f"{DATASET}/config.toml"))
    again = ingest(s3_event(f"{DATASET}/config.toml"))  # a duplicate delivery changes nothing

    assert first == again == {"batchItemFailures": []}
    job = repository.require(current_job_id())
    assert job.status is JobStatus.FAILED
    [problem] = job.errors
    assert problem.code is ErrorCode.INTERNAL_ERROR
    assert "ConnectionResetError: connection reset by peer" in problem.message
    [notice] = announced(cloud)
    assert (notice["job_id"], notice["status"]) == (job.job_id, "FAILED")
    assert executions(cloud) == {}


def test_given_job_failed_in_validation_when_retried_through_the_api_then_ingest_validates_and_starts_it(
    cloud: Cloud, repository: JobRepository, context: FakeLambdaContext
) -> None:
    upload_dataset(DATASET, valid_dataset_files())
    make_ingest(cloud, context, store=ReaderFails)(s3_event(f"{DATASET}/config.toml"))
    job_id = current_job_id()
    announced(cloud)

    build_queries(ApiSettings.from_environ(cloud.env())).retry_job(job_id)
    sqs = boto3.client("sqs", region_name=REGION)
    [message] = sqs.receive_message(QueueUrl=cloud.upload_queue_url)["Messages"]
    event = s3_event(f"{DATASET}/config.toml")
    event["Records"][0]["body"] = message["Body"]
    response = make_ingest(cloud, context)(event)

    assert response == {"batchItemFailures": []}
    job = repository.require(job_id)
    assert (job.status, job.attempt, job.errors) == (JobStatus.QUEUED, 2, [])
    assert job.config_file == "config.toml"
    assert list(executions(cloud)) == [f"{job_id}-2"]
    assert announced(cloud) == []


def test_given_rejected_version_when_its_bad_file_is_deleted_then_a_new_validation_queues_a_new_job(
    cloud: Cloud, repository: JobRepository, ingest: Ingest
) -> None:
    bad = f"{DATASET}/20_zqxj dog/broken.png"
    upload_dataset(DATASET, valid_dataset_files() | {"20_zqxj dog/broken.png": b"this is not a PNG"})
    ingest(s3_event(bad))
    rejected_id = current_job_id()
    assert repository.require(rejected_id).status is JobStatus.REJECTED
    boto3.client("s3", region_name=REGION).delete_object(Bucket=DATASET_BUCKET, Key=bad)

    response = ingest(s3_event(bad, event_name="ObjectRemoved:Delete"))

    assert response == {"batchItemFailures": []}
    new_id = current_job_id()
    assert new_id != rejected_id
    assert repository.require(new_id).status is JobStatus.QUEUED
    assert repository.require(rejected_id).status is JobStatus.REJECTED  # an ended job stays as it was
    assert list(executions(cloud)) == [f"{new_id}-1"]
    assert [(n["job_id"], n["status"]) for n in announced(cloud)] == [(rejected_id, "REJECTED")]


class CancelledWhileReading:
    """A dataset store whose first read lets `meanwhile` run: another actor changes the job mid-validation."""

    def __init__(self, inner: DatasetStore, meanwhile: Callable[[], None]) -> None:
        self._inner = inner
        self._meanwhile: Callable[[], None] | None = meanwhile

    def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        return self._inner.list_objects(bucket, prefix)

    def reader(self, bucket: str) -> ObjectReader:
        meanwhile, self._meanwhile = self._meanwhile, None
        if meanwhile is not None:
            meanwhile()
        return self._inner.reader(bucket)


def test_given_job_cancelled_while_being_validated_when_validation_ends_then_it_stays_cancelled(
    cloud: Cloud, repository: JobRepository, context: FakeLambdaContext
) -> None:
    upload_dataset(DATASET, valid_dataset_files())
    job_id = current_job_id()
    control = _control(cloud, repository)

    def cancel() -> None:
        control.cancel(job_id, cancelled_by_user())  # e.g. POST /jobs/{job_id}/cancel, or a newer version

    ingest = make_ingest(cloud, context, store=lambda inner: CancelledWhileReading(inner, cancel))
    ingest(s3_event(f"{DATASET}/config.toml"))

    job = repository.require(job_id)
    assert (job.status, [p.code for p in job.errors]) == (JobStatus.CANCELLED, [ErrorCode.CANCELLED])
    assert executions(cloud) == {}


def test_given_stopping_older_training_job_is_throttled_when_newer_version_arrives_then_newer_still_runs(
    cloud: Cloud, repository: JobRepository, context: FakeLambdaContext
) -> None:
    upload_dataset(DATASET, valid_dataset_files())
    make_ingest(cloud, context)(s3_event(f"{DATASET}/config.toml"))
    older: Job = repository.require(current_job_id())
    names = [f"loraflow-{older.job_id}-1-1"]
    repository.transition(
        older.job_id,
        JobStatus.TRAINING,
        if_attempt=1,
        attempts=[older.attempts[0].model_copy(update={"training_job_names": names})],
    )
    sagemaker = boto3.client("sagemaker", region_name=REGION)
    stubber = Stubber(sagemaker)
    stubber.add_client_error("stop_training_job", "ThrottlingException", http_status_code=400)
    upload_dataset(DATASET, {"20_zqxj dog/img 3.png": png(3)})

    with stubber:
        make_ingest(cloud, context, sagemaker=sagemaker)(s3_event(ADDED))

    assert repository.require(current_job_id()).status is JobStatus.QUEUED
    assert [(n["job_id"], n["status"]) for n in announced(cloud)] == [(older.job_id, "CANCELLED")]
