"""`GET /jobs/{job_id}` shows training progress from the trainer's progress.json, and never fails over it."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from functions_aws import ARTIFACTS_BUCKET, REGION, Cloud, FakeLambdaContext, claim_job, load_event
from loraflow_api import app
from loraflow_api.adapters import build_queries
from loraflow_api.logic import JobQueries
from loraflow_api.settings import ApiSettings
from loraflow_shared.jobs.model import Artifacts, Job, JobStatus, progress_key
from loraflow_shared.jobs.repository import JobRepository

JOB_ID = load_event("apigw_get_job.json")["pathParameters"]["job_id"]
PROGRESS = {
    "step": 120,
    "total_steps": 400,
    "loss": 0.0831,
    "eta_seconds": 95.5,
    "steps_per_second": 2.93,
    "updated_at": "2025-01-15T10:02:00.000Z",
}
CURVE = [{"step": 10, "loss": 0.2}, {"step": 120, "loss": 0.0831}]


@pytest.fixture
def repository(cloud: Cloud) -> JobRepository:
    return JobRepository(cloud.table)


def _queries(cloud: Cloud, bucket: str = ARTIFACTS_BUCKET) -> JobQueries:
    return build_queries(ApiSettings.from_environ(cloud.env() | {"ARTIFACTS_BUCKET": bucket}))


def _get_job(queries: JobQueries) -> tuple[int, dict[str, Any]]:
    response = app.lambda_handler(load_event("apigw_get_job.json"), FakeLambdaContext(), queries=queries)
    return response["statusCode"], json.loads(response["body"])


def _list_all(queries: JobQueries) -> tuple[int, dict[str, Any]]:
    event = load_event("apigw_list_jobs.json") | {"queryStringParameters": None}
    response = app.lambda_handler(event, FakeLambdaContext(), queries=queries)
    return response["statusCode"], json.loads(response["body"])


def _job_in(repository: JobRepository, status: JobStatus) -> Job:
    path = [JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS, JobStatus.COMPLETED]
    statuses = path[: path.index(status) + 1]
    return claim_job(repository, JOB_ID, statuses, dataset_s3_uri="s3://datasets/0001-dataset/")


def _write_progress(body: bytes) -> None:
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=ARTIFACTS_BUCKET, Key=progress_key(JOB_ID), Body=body
    )


def test_given_training_job_with_progress_file_when_fetched_then_step_total_loss_eta_and_time(
    cloud: Cloud, repository: JobRepository
) -> None:
    _job_in(repository, JobStatus.TRAINING)
    _write_progress(json.dumps(PROGRESS).encode())

    status, body = _get_job(_queries(cloud))

    assert status == 200
    assert body["status"] == "TRAINING"
    assert body["progress"] == {
        "step": 120,
        "total_steps": 400,
        "loss": 0.0831,
        "eta_seconds": 95.5,
        "updated_at": "2025-01-15T10:02:00.000Z",
    }


def test_given_training_job_before_its_first_report_when_fetched_then_progress_null(
    cloud: Cloud, repository: JobRepository
) -> None:
    _job_in(repository, JobStatus.TRAINING)

    status, body = _get_job(_queries(cloud))

    assert (status, body["status"], body["progress"]) == (200, "TRAINING", None)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        json.dumps({**PROGRESS, "step": -1}).encode(),
        json.dumps({key: value for key, value in PROGRESS.items() if key != "total_steps"}).encode(),
        b'{"step": 1, "total_steps": 2, "loss": NaN, "updated_at": "2025-01-15T10:02:00Z"}',
        b"[]",
    ],
)
def test_given_malformed_progress_file_when_fetched_then_progress_null_and_a_log_line(
    cloud: Cloud, repository: JobRepository, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    _job_in(repository, JobStatus.TRAINING)
    _write_progress(body)

    status, view = _get_job(_queries(cloud))

    assert (status, view["progress"]) == (200, None)
    logged = [r for r in caplog.records if r.getMessage() == "ignoring malformed progress.json"]
    assert [(r.levelname, getattr(r, "job_id", None)) for r in logged] == [("WARNING", JOB_ID)]


def test_given_unreadable_progress_location_when_fetched_then_job_still_served_without_progress(
    cloud: Cloud, repository: JobRepository
) -> None:
    _job_in(repository, JobStatus.TRAINING)

    status, body = _get_job(_queries(cloud, bucket="no-such-bucket"))  # S3 answers NoSuchBucket

    assert (status, body["job_id"], body["progress"]) == (200, JOB_ID, None)


def test_given_finished_training_with_leftover_progress_when_fetched_then_no_progress(
    cloud: Cloud, repository: JobRepository
) -> None:
    _job_in(repository, JobStatus.GENERATING_PREVIEWS)
    _write_progress(json.dumps(PROGRESS).encode())

    _, body = _get_job(_queries(cloud))

    assert (body["status"], body["progress"]) == ("GENERATING_PREVIEWS", None)


def test_given_job_recorded_before_kohya_export_when_fetched_then_kohya_url_null(
    cloud: Cloud, repository: JobRepository
) -> None:
    _job_in(repository, JobStatus.GENERATING_PREVIEWS)
    prefix = f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}"
    repository.update(
        JOB_ID,
        artifacts=Artifacts(
            lora_diffusers_s3_uri=f"{prefix}/lora/pytorch_lora_weights.safetensors",
            training_report_s3_uri=f"{prefix}/training_report.json",
        ),
    )

    _, body = _get_job(_queries(cloud))

    assert body["artifacts"]["lora_kohya_url"] is None
    assert body["artifacts"]["lora_diffusers_url"].startswith("https://")


def test_given_training_job_with_a_loss_curve_when_fetched_then_the_curve_so_far(
    cloud: Cloud, repository: JobRepository
) -> None:
    _job_in(repository, JobStatus.TRAINING)
    _write_progress(json.dumps(PROGRESS | {"loss_curve": CURVE}).encode())

    status, body = _get_job(_queries(cloud))

    assert (status, body["loss_curve"]) == (200, CURVE)


def test_given_training_job_when_every_job_is_listed_then_it_shows_progress_but_no_curve(
    cloud: Cloud, repository: JobRepository
) -> None:
    _job_in(repository, JobStatus.TRAINING)
    _write_progress(json.dumps(PROGRESS | {"loss_curve": CURVE}).encode())

    status, body = _list_all(_queries(cloud))

    [item] = body["items"]
    assert (status, item["job_id"], item["progress"]["step"], item["loss_curve"]) == (200, JOB_ID, 120, None)
