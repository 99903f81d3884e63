from __future__ import annotations

import copy
import json
import re
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from functions_aws import ARTIFACTS_BUCKET, Cloud, FakeLambdaContext, load_event
from loraflow_api import app
from loraflow_api.adapters import build_queries
from loraflow_api.gallery import page
from loraflow_api.logic import JobQueries
from loraflow_api.settings import ApiSettings
from loraflow_shared.contracts import LossPoint
from loraflow_shared.jobs.model import Artifacts, Job, JobStatus, Preview, TrainingSummary
from loraflow_shared.jobs.repository import JobRepository

DATASET = "0001-dataset"


@pytest.fixture
def queries(cloud: Cloud) -> JobQueries:
    return build_queries(ApiSettings.from_environ(cloud.env()))


@pytest.fixture
def repository(cloud: Cloud) -> JobRepository:
    return JobRepository(cloud.table)


def call(
    queries: JobQueries, context: FakeLambdaContext, event: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    response = app.lambda_handler(event, context, queries=queries)
    return response["statusCode"], json.loads(response["body"])


def get_job_event(job_id: str) -> dict[str, Any]:
    event = load_event("apigw_get_job.json")
    event["path"] = f"/jobs/{job_id}"
    event["pathParameters"] = {"job_id": job_id}
    return event


def list_event(**query: str) -> dict[str, Any]:
    event = copy.deepcopy(load_event("apigw_list_jobs.json"))
    event["queryStringParameters"] = query or None
    event["multiValueQueryStringParameters"] = {k: [v] for k, v in query.items()} or None
    return event


def claim(repository: JobRepository, job_id: str, created_at: str) -> Job:
    job = Job(
        job_id=job_id,
        dataset=DATASET,
        status=JobStatus.VALIDATING,
        created_at=created_at,
        updated_at=created_at,
        fingerprint="f" * 64,
        dataset_s3_uri=f"s3://datasets/{DATASET}/",
    )
    return repository.claim(job).job


def completed_job(repository: JobRepository) -> Job:
    job_id = load_event("apigw_get_job.json")["pathParameters"]["job_id"]
    claim(repository, job_id, "2025-01-15T10:00:00.000Z")
    for status in (JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.TRAINING):  # a retried step: twice
        repository.transition(job_id, status)
    repository.transition(
        job_id,
        JobStatus.GENERATING_PREVIEWS,
        preview_task_token="secret-token",
        training=TrainingSummary(
            job_name=f"loraflow-{job_id}",
            steps=2,
            final_loss=0.25,
            seconds=1.5,
            epochs=1,
            peak_rss_mb=900.0,
            loss_curve=[LossPoint(step=1, loss=0.5), LossPoint(step=2, loss=0.25)],
        ),
        artifacts=Artifacts(
            lora_diffusers_s3_uri=f"s3://{ARTIFACTS_BUCKET}/jobs/{job_id}/lora/pytorch_lora_weights.safetensors",
            training_report_s3_uri=f"s3://{ARTIFACTS_BUCKET}/jobs/{job_id}/training_report.json",
            lora_kohya_s3_uri=f"s3://{ARTIFACTS_BUCKET}/jobs/{job_id}/lora/zqxj.safetensors",
        ),
    )
    return repository.transition(
        job_id,
        JobStatus.COMPLETED,
        preview_task_token=None,
        previews=[
            Preview(
                prompt="zqxj dog",
                s3_uri=f"s3://{ARTIFACTS_BUCKET}/jobs/{job_id}/previews/0.png",
                base_s3_uri=f"s3://{ARTIFACTS_BUCKET}/jobs/{job_id}/previews/base-0.png",
            )
        ],
        contact_sheet_s3_uri=f"s3://{ARTIFACTS_BUCKET}/jobs/{job_id}/previews/contact-sheet.png",
    )


def test_given_completed_job_when_fetched_then_view_with_presigned_urls_and_no_internals(
    queries: JobQueries, repository: JobRepository, context: FakeLambdaContext
) -> None:
    job = completed_job(repository)

    status, body = call(queries, context, load_event("apigw_get_job.json"))

    assert status == 200
    assert (body["job_id"], body["status"], body["dataset"]) == (job.job_id, "COMPLETED", DATASET)
    assert body["training"] == {
        "job_name": f"loraflow-{job.job_id}",
        "steps": 2,
        "final_loss": 0.25,
        "seconds": 1.5,
        "epochs": 1,
        "peak_rss_mb": 900.0,
        "peak_cuda_mb": None,
    }
    lora_url = urlparse(body["artifacts"]["lora_diffusers_url"])
    assert lora_url.path.endswith(f"/jobs/{job.job_id}/lora/pytorch_lora_weights.safetensors")
    assert parse_qs(lora_url.query)["X-Amz-Expires"] == ["600"]
    kohya_url = urlparse(body["artifacts"]["lora_kohya_url"])
    assert kohya_url.path.endswith(f"/jobs/{job.job_id}/lora/zqxj.safetensors")
    assert parse_qs(kohya_url.query)["X-Amz-Expires"] == ["600"]
    assert body["progress"] is None
    assert [change["status"] for change in body["history"]] == [
        "VALIDATING",
        "QUEUED",
        "TRAINING",
        "GENERATING_PREVIEWS",
        "COMPLETED",
    ]
    assert body["history"][0]["at"] == "2025-01-15T10:00:00.000Z"
    assert body["loss_curve"] == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    [preview] = body["previews"]
    assert preview["prompt"] == "zqxj dog"
    assert urlparse(preview["url"]).path.endswith("/previews/0.png")
    assert urlparse(preview["base_url"]).path.endswith("/previews/base-0.png")
    assert urlparse(body["contact_sheet_url"]).path.endswith("/previews/contact-sheet.png")
    assert parse_qs(urlparse(body["contact_sheet_url"]).query)["X-Amz-Expires"] == ["600"]
    assert not {"preview_task_token", "notified_at", "fingerprint"} & body.keys()
    assert "secret-token" not in json.dumps(body)


def test_given_unknown_job_when_fetched_then_404_job_not_found(
    queries: JobQueries, context: FakeLambdaContext, cloud: Cloud
) -> None:
    status, body = call(queries, context, get_job_event("0" * 24))
    assert status == 404
    assert body["code"] == "JOB_NOT_FOUND"
    assert "0" * 24 in body["message"]


@pytest.mark.parametrize(
    ("query", "mentioned"),
    [
        ({"dataset": ""}, "dataset"),
        ({"dataset": DATASET, "limit": "0"}, "limit"),
        ({"datset": DATASET}, "datset"),
    ],
)
def test_given_bad_query_when_listing_then_400_naming_the_parameter(
    queries: JobQueries, context: FakeLambdaContext, query: dict[str, str], mentioned: str
) -> None:
    status, body = call(queries, context, list_event(**query))
    assert status == 400
    assert body["code"] == "BAD_REQUEST"
    assert mentioned in body["message"]


def test_given_three_jobs_when_listed_two_per_page_then_newest_first_across_pages(
    queries: JobQueries, repository: JobRepository, context: FakeLambdaContext
) -> None:
    ids = [claim(repository, f"{n:024x}", f"2025-01-15T10:00:0{n}.000Z").job_id for n in range(3)]

    status, first = call(queries, context, list_event(dataset=DATASET, limit="2"))
    _, second = call(queries, context, list_event(dataset=DATASET, limit="2", next_token=first["next_token"]))

    assert status == 200
    assert [item["job_id"] for item in first["items"] + second["items"]] == list(reversed(ids))
    assert first["next_token"] and second["next_token"] is None


def test_given_forged_next_token_when_listing_then_400(
    queries: JobQueries, context: FakeLambdaContext
) -> None:
    status, body = call(queries, context, list_event(dataset=DATASET, next_token="Zm9yZ2Vk"))
    assert (status, body["code"]) == (400, "BAD_REQUEST")


def test_given_unknown_route_when_called_then_404_json(
    queries: JobQueries, context: FakeLambdaContext
) -> None:
    event = load_event("apigw_list_jobs.json") | {"path": "/nope", "resource": "/nope"}
    status, body = call(queries, context, event)
    assert status == 404
    assert "/nope" in body["message"]


def test_given_the_root_path_when_fetched_then_the_gallery_page_served_with_a_strict_policy(
    queries: JobQueries, context: FakeLambdaContext
) -> None:
    event = load_event("apigw_list_jobs.json") | {"path": "/", "resource": "/", "queryStringParameters": None}

    response = app.lambda_handler(event, context, queries=queries)

    headers = response.get("multiValueHeaders") or {k: [v] for k, v in response["headers"].items()}
    assert response["statusCode"] == 200
    assert headers["Content-Type"] == ["text/html; charset=utf-8"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"][0]
    assert "<title>loraflow</title>" in response["body"]
    assert "localStorage.getItem(KEY_STORE)" in response["body"]
    # Nothing is fetched from elsewhere: the only absolute URL is SVG's namespace name.
    assert set(re.findall(r"https?://[^\s\"'`]+", response["body"])) == {"http://www.w3.org/2000/svg"}


def test_given_the_gallery_page_when_served_then_it_carries_the_apis_own_statuses_and_bounds() -> None:
    constants = json.loads(
        re.findall(r'<script id="loraflow-constants" type="application/json">(.*?)</script>', page())[0]
    )

    assert constants["unfinished_statuses"] == ["VALIDATING", "QUEUED", "TRAINING", "GENERATING_PREVIEWS"]
    assert constants["retryable_statuses"] == ["CANCELLED", "FAILED"]
    assert constants["lora_scale"] == {"minimum": -2, "maximum": 2}
    assert constants["steps"] == {"minimum": 1, "maximum": 150}
