"""What a terminal notification tells its subscriber without a second call: where the job is in the API,
which attempt ended, and on COMPLETED where the LoRA files and previews are and what training cost."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from jobs_aws import REGION, new_job
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.control import cancelled_by_user, superseded_by
from loraflow_shared.jobs.model import (
    TERMINAL_STATUSES,
    Artifacts,
    Attempt,
    Cost,
    Job,
    JobStatus,
    Preview,
    TrainingSummary,
)
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier, announce_terminal, terminal_notification

JOB_ID = "c" * 24
ARTIFACTS = Artifacts(
    lora_diffusers_s3_uri=f"s3://artifacts/jobs/{JOB_ID}/lora/pytorch_lora_weights.safetensors",
    training_report_s3_uri=f"s3://artifacts/jobs/{JOB_ID}/training_report.json",
    lora_kohya_s3_uri=f"s3://artifacts/jobs/{JOB_ID}/lora/zqxj.safetensors",
)
_PREFIX = f"s3://artifacts/jobs/{JOB_ID}/previews/"
PREVIEWS = [
    Preview(prompt="a photo of zqxj dog", s3_uri=f"{_PREFIX}0.png", base_s3_uri=f"{_PREFIX}base-0.png"),
    Preview(prompt="zqxj dog", s3_uri=f"{_PREFIX}1.png", base_s3_uri=f"{_PREFIX}base-1.png"),
]
CONTACT_SHEET = f"{_PREFIX}contact-sheet.png"
COST = Cost(
    instance_type="ml.g5.2xlarge",
    instance_count=1,
    training_seconds=1200,
    billable_seconds=480,
    spot=True,
    price_per_hour_usd=1.515,
    estimated_usd=0.202,
)


def _body(job: Job) -> dict[str, Any]:
    _, message, _ = terminal_notification(job)
    body: dict[str, Any] = json.loads(message)
    return body


def _completed() -> Job:
    attempts = [
        Attempt(number=1, execution_name=f"{JOB_ID}-1", started_at="t1", status=JobStatus.CANCELLED),
        Attempt(
            number=2, execution_name=f"{JOB_ID}-2", started_at="t2", status=JobStatus.COMPLETED, cost=COST
        ),
    ]
    return new_job(JOB_ID).model_copy(
        update={
            "status": JobStatus.COMPLETED,
            "attempt": 2,
            "attempts": attempts,
            "training": TrainingSummary(
                job_name=f"loraflow-{JOB_ID}-2-1", steps=40, final_loss=0.1, seconds=9
            ),
            "artifacts": ARTIFACTS,
            "previews": PREVIEWS,
            "contact_sheet_s3_uri": CONTACT_SHEET,
            "cost": COST,
            "preview_task_token": "secret-task-token",
        }
    )


def test_given_completed_job_when_formatted_then_body_has_api_path_attempt_artifacts_previews_and_cost() -> (
    None
):
    body = _body(_completed())

    assert (body["job_id"], body["status"], body["errors"]) == (JOB_ID, "COMPLETED", [])
    assert body["api_path"] == f"/jobs/{JOB_ID}"
    assert body["attempt"] == 2
    assert body["artifacts"] == {
        "lora_diffusers_s3_uri": ARTIFACTS.lora_diffusers_s3_uri,
        "training_report_s3_uri": ARTIFACTS.training_report_s3_uri,
        "lora_kohya_s3_uri": ARTIFACTS.lora_kohya_s3_uri,
    }
    assert body["previews"] == [
        {"prompt": p.prompt, "s3_uri": p.s3_uri, "base_s3_uri": p.base_s3_uri} for p in PREVIEWS
    ]
    assert body["contact_sheet_s3_uri"] == CONTACT_SHEET
    assert body["preview_count"] == 2
    assert body["cost"] == {
        "instance_type": "ml.g5.2xlarge",
        "instance_count": 1,
        "training_seconds": 1200,
        "billable_seconds": 480,
        "spot": True,
        "price_per_hour_usd": 1.515,
        "estimated_usd": 0.202,
    }
    assert "secret-task-token" not in json.dumps(body)
    assert not {"preview_task_token", "notified_at"} & body.keys()


@pytest.mark.parametrize(
    "reason", [cancelled_by_user(), superseded_by(new_job("d" * 24))], ids=["by-request", "superseded"]
)
def test_given_cancelled_job_when_formatted_then_reason_in_errors_and_no_outcome(reason: Problem) -> None:
    job = new_job(JOB_ID).model_copy(update={"status": JobStatus.CANCELLED, "errors": [reason]})

    body = _body(job)

    assert body["status"] == "CANCELLED"
    assert body["errors"] == [{"code": reason.code.value, "path": "", "message": reason.message}]
    assert (body["api_path"], body["attempt"], body["cost"], body["preview_count"]) == (
        f"/jobs/{JOB_ID}",
        1,
        None,
        0,
    )
    assert not {"artifacts", "previews"} & body.keys()


def test_given_superseded_job_when_formatted_then_the_reason_names_the_newer_job() -> None:
    newer = new_job("d" * 24)
    job = new_job(JOB_ID).model_copy(update={"status": JobStatus.CANCELLED, "errors": [superseded_by(newer)]})

    [error] = _body(job)["errors"]

    assert error["code"] == ErrorCode.SUPERSEDED.value
    assert newer.job_id in error["message"]


def test_given_failed_job_that_was_billed_when_formatted_then_cost_without_artifacts() -> None:
    problem = Problem(code=ErrorCode.OUT_OF_MEMORY, path="", message="CUDA out of memory")
    job = new_job(JOB_ID).model_copy(update={"status": JobStatus.FAILED, "errors": [problem], "cost": COST})

    body = _body(job)

    assert body["errors"][0]["code"] == "OUT_OF_MEMORY"
    assert body["cost"]["billable_seconds"] == 480
    assert "artifacts" not in body


NOT_TERMINAL = sorted(set(JobStatus) - TERMINAL_STATUSES)


@pytest.mark.parametrize("status", NOT_TERMINAL)
def test_given_job_not_ended_when_formatted_then_refused(status: JobStatus) -> None:
    with pytest.raises(ValueError, match="not terminal"):
        terminal_notification(new_job(JOB_ID).model_copy(update={"status": status}))


class Published:
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def publish_terminal(self, job: Job) -> None:
        self.jobs.append(job)


def test_given_jobs_not_ended_when_announced_then_nothing_is_published_or_recorded(
    repository: JobRepository,
) -> None:
    published = Published()
    job = repository.claim(new_job(JOB_ID)).job
    for status in (JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS):
        job = repository.transition(JOB_ID, status)

        assert announce_terminal(job, repository, published) == job
    assert published.jobs == []
    assert repository.require(JOB_ID).notified_at is None


def test_given_completed_job_when_published_then_subscriber_receives_the_full_body(aws: None) -> None:
    sns, sqs = boto3.client("sns", region_name=REGION), boto3.client("sqs", region_name=REGION)
    topic_arn = sns.create_topic(Name="notifications")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="subscriber")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    job = _completed()

    Notifier(sns, topic_arn).publish_terminal(job)

    [message] = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    envelope = json.loads(message["Body"])
    assert json.loads(envelope["Message"]) == _body(job)
    assert envelope["MessageAttributes"]["status"]["Value"] == "COMPLETED"
