from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from jobs_aws import REGION, new_job
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.model import Job, JobStatus
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier, announce_terminal, terminal_notification


def _rejected(dataset: str = "0001-dataset") -> Job:
    problem = Problem(code=ErrorCode.NO_ASSET_FOLDER, path="", message="no subset folder")
    return new_job(dataset=dataset).model_copy(update={"status": JobStatus.REJECTED, "errors": [problem]})


def test_given_rejected_job_when_formatted_then_body_and_status_attribute() -> None:
    job = _rejected()
    subject, message, attributes = terminal_notification(job)
    body = json.loads(message)
    assert body["status"] == "REJECTED"
    assert body["errors"] == [{"code": "NO_ASSET_FOLDER", "path": "", "message": "no subset folder"}]
    assert {"job_id", "dataset", "warnings", "created_at", "updated_at"} <= body.keys()
    assert attributes == {"status": {"DataType": "String", "StringValue": "REJECTED"}}
    assert "REJECTED" in subject


def test_given_long_unicode_dataset_when_formatted_then_subject_is_short_ascii() -> None:
    subject, _, _ = terminal_notification(_rejected(dataset="chats-" + "é" * 200 + "\nx"))
    assert len(subject) <= 100
    assert subject.isascii()
    assert "\n" not in subject


def test_given_running_job_when_formatted_then_refused() -> None:
    with pytest.raises(ValueError, match="not terminal"):
        terminal_notification(new_job())


def _subscribed_queue() -> tuple[str, str]:
    sns, sqs = boto3.client("sns", region_name=REGION), boto3.client("sqs", region_name=REGION)
    topic_arn = sns.create_topic(Name="notifications")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="inbox")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    return topic_arn, queue_url


def _received(queue_url: str) -> list[dict[str, Any]]:
    sqs = boto3.client("sqs", region_name=REGION)
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(message["Body"]) for message in messages]


def test_given_terminal_job_when_announced_twice_then_one_message_with_attribute(
    repository: JobRepository,
) -> None:
    topic_arn, queue_url = _subscribed_queue()
    job = repository.claim(new_job()).job
    job = repository.transition(job.job_id, JobStatus.REJECTED, errors=_rejected().errors)
    notifier = Notifier(boto3.client("sns", region_name=REGION), topic_arn)

    announced = announce_terminal(job, repository, notifier)
    announce_terminal(announced, repository, notifier)
    announce_terminal(repository.require(job.job_id), repository, notifier)

    [envelope] = _received(queue_url)
    assert json.loads(envelope["Message"])["job_id"] == job.job_id
    assert envelope["MessageAttributes"]["status"]["Value"] == "REJECTED"
    assert repository.require(job.job_id).notified_at is not None
