"""The only boto3 code of PreviewCallbackFunction: DynamoDB, S3 results, Step Functions task tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.s3 import parse_s3_uri

from loraflow_callback.logic import PreviewCallback
from loraflow_callback.settings import CallbackSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_stepfunctions import SFNClient


class StepFunctionsTaskTokens:
    def __init__(self, client: SFNClient) -> None:
        self._client = client
        errors = client.exceptions
        # The task stopped waiting; retrying would never succeed.
        self._gone = (errors.TaskTimedOut, errors.TaskDoesNotExist, errors.InvalidToken)

    def succeed(self, token: str, output: str) -> bool:
        try:
            self._client.send_task_success(taskToken=token, output=output)
        except self._gone:
            return False
        return True

    def fail(self, token: str, error: str, cause: str) -> bool:
        try:
            self._client.send_task_failure(taskToken=token, error=error, cause=cause)
        except self._gone:
            return False
        return True


class S3ResultStore:
    def __init__(self, client: S3Client) -> None:
        self._client = client

    def read_text(self, uri: str) -> str | None:
        bucket, key = parse_s3_uri(uri)
        try:
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self._client.exceptions.NoSuchKey:
            return None
        return body.decode("utf-8", errors="replace")


def build_callback(settings: CallbackSettings) -> PreviewCallback:
    return PreviewCallback(
        repository=JobRepository(boto3.resource("dynamodb").Table(settings.jobs_table)),
        tokens=StepFunctionsTaskTokens(boto3.client("stepfunctions")),
        results=S3ResultStore(boto3.client("s3")),
    )
