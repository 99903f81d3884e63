"""The user-facing notification sent once per job when it reaches a terminal status."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

from loraflow_shared.jobs.model import Job

if TYPE_CHECKING:
    from mypy_boto3_sns import SNSClient

    from loraflow_shared.jobs.repository import JobRepository

_SUBJECT_LIMIT = 100  # SNS rejects longer subjects


def job_api_path(job_id: str) -> str:
    """The job's resource in the jobs API (relative to the stack's ApiUrl)."""
    return f"/jobs/{job_id}"


def terminal_notification(job: Job) -> tuple[str, str, dict[str, Any]]:
    """`(subject, message_json, message_attributes)` for a job in a terminal status.

    The body carries what a subscriber needs without a second call: the API path, the reason of a
    failure or cancellation, and on COMPLETED the S3 URIs of the LoRA files, report, previews (base and
    LoRA) and contact sheet, plus the training cost. Subscribers can filter on the `status` message attribute.
    """
    if not job.is_terminal:
        raise ValueError(f"job {job.job_id} is {job.status.value}, not terminal: nothing to announce")
    body: dict[str, Any] = {
        "job_id": job.job_id,
        "dataset": job.dataset,
        "status": job.status.value,
        "attempt": job.attempt,
        "api_path": job_api_path(job.job_id),
        "errors": [problem.model_dump(mode="json") for problem in job.errors],
        "warnings": [problem.model_dump(mode="json") for problem in job.warnings],
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "preview_count": len(job.previews),
        "cost": job.cost.model_dump(mode="json") if job.cost is not None else None,
    }
    if job.artifacts is not None:
        body["artifacts"] = job.artifacts.model_dump(mode="json")
    if job.previews:
        body["previews"] = [preview.model_dump(mode="json") for preview in job.previews]
    if job.contact_sheet_s3_uri is not None:
        body["contact_sheet_s3_uri"] = job.contact_sheet_s3_uri
    # SNS subjects must be ASCII without line breaks.
    subject = f"loraflow {job.status.value}: {job.dataset}".encode("ascii", "replace").decode()
    subject = " ".join(subject.split())[:_SUBJECT_LIMIT]
    attributes = {"status": {"DataType": "String", "StringValue": job.status.value}}
    return subject, json.dumps(body), attributes


class TerminalNotifier(Protocol):
    def publish_terminal(self, job: Job) -> None: ...


class Notifier:
    def __init__(self, sns_client: SNSClient, topic_arn: str) -> None:
        self._sns = sns_client
        self._topic_arn = topic_arn

    def publish_terminal(self, job: Job) -> None:
        subject, message, attributes = terminal_notification(job)
        self._sns.publish(
            TopicArn=self._topic_arn, Subject=subject, Message=message, MessageAttributes=attributes
        )


def announce_terminal(job: Job, repository: JobRepository, notifier: TerminalNotifier) -> Job:
    """Publish the terminal notification unless it already went out, then remember that it did.

    Publishing before recording means a crash in between re-sends on retry (at least once) rather
    than losing the notification.
    """
    if not job.is_terminal or job.notified_at is not None:
        return job
    notifier.publish_terminal(job)
    return repository.update(job.job_id, notified_at=repository.now())
