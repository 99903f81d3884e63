"""The boto3 side of job control (`control.JobControl`), shared by the ingest function and the jobs API."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus

from botocore.exceptions import ClientError

from loraflow_shared.contracts import ExecutionInput
from loraflow_shared.jobs.control import JobControl
from loraflow_shared.jobs.model import Job, execution_name, preview_cancel_key
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import TerminalNotifier
from loraflow_shared.s3 import parse_s3_uri

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sagemaker import SageMakerClient
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_stepfunctions import SFNClient


class StepFunctionsExecutions:
    def __init__(self, client: SFNClient, state_machine_arn: str) -> None:
        self._client = client
        self._state_machine_arn = state_machine_arn

    def start(self, execution_input: ExecutionInput) -> str:
        name = execution_name(execution_input.job_id, execution_input.attempt)
        try:
            response = self._client.start_execution(
                stateMachineArn=self._state_machine_arn, name=name, input=execution_input.model_dump_json()
            )
            return response["executionArn"]
        except self._client.exceptions.ExecutionAlreadyExists:
            return self.execution_arn(name)

    def stop(self, execution_arn: str, cause: str) -> None:
        # One that never started (a crash between QUEUED and StartExecution) has nothing to stop.
        with contextlib.suppress(self._client.exceptions.ExecutionDoesNotExist):
            self._client.stop_execution(executionArn=execution_arn, cause=cause)

    def execution_arn(self, name: str) -> str:
        # arn:aws:states:<region>:<account>:stateMachine:<sm> -> ...:execution:<sm>:<name>
        return self._state_machine_arn.replace(":stateMachine:", ":execution:", 1) + f":{name}"


class SageMakerTrainingJobs:
    def __init__(self, client: SageMakerClient) -> None:
        self._client = client

    def stop(self, name: str) -> None:
        try:
            self._client.stop_training_job(TrainingJobName=name)
        except ClientError as exc:
            # Never created (capacity retry pending) or already ended: SageMaker answers ValidationException.
            if exc.response.get("Error", {}).get("Code") not in {"ValidationException", "ResourceNotFound"}:
                raise


class S3PreviewCancellations:
    def __init__(self, client: S3Client, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    def cancel(self, inference: str) -> None:
        self._client.put_object(Bucket=self._bucket, Key=preview_cancel_key(inference), Body=b"cancelled\n")


class QueueRevalidation:
    """Sends the ingest queue an S3-event-shaped message for the job's dataset folder."""

    def __init__(self, client: SQSClient, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

    def request(self, job: Job) -> None:
        bucket, prefix = parse_s3_uri(job.dataset_s3_uri)
        record: dict[str, Any] = {
            "eventName": "loraflow:Revalidate",
            # Keys in S3 events are quote_plus-encoded; the ingest function decodes them.
            "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(prefix)}},
        }
        # DelaySeconds 0: the dataset settled long ago; the queue's own delay is for fresh uploads.
        self._client.send_message(
            QueueUrl=self._queue_url, MessageBody=json.dumps({"Records": [record]}), DelaySeconds=0
        )


def build_control(
    repository: JobRepository,
    notifier: TerminalNotifier,
    clients: dict[str, Any],
    state_machine_arn: str,
    artifacts_bucket: str,
    upload_queue_url: str | None = None,
) -> JobControl:
    """`clients`: boto3 clients by service name (stepfunctions, sagemaker, s3 and, for retries, sqs)."""
    revalidation = (
        QueueRevalidation(clients["sqs"], upload_queue_url) if upload_queue_url is not None else None
    )
    return JobControl(
        repository=repository,
        notifier=notifier,
        executions=StepFunctionsExecutions(clients["stepfunctions"], state_machine_arn),
        training_jobs=SageMakerTrainingJobs(clients["sagemaker"]),
        previews=S3PreviewCancellations(clients["s3"], artifacts_bucket),
        revalidation=revalidation,
    )
