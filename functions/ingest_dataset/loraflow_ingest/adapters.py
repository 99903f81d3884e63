"""The only boto3 code of IngestDatasetFunction: S3 listings/reads, DynamoDB, SNS, Step Functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from loraflow_shared.contracts import ExecutionInput
from loraflow_shared.dataset.objects import ObjectInfo, ObjectReader
from loraflow_shared.dataset.validate import READ_THREADS
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier
from loraflow_shared.s3 import S3ObjectReader, list_objects

from loraflow_ingest.logic import Ingestor
from loraflow_ingest.settings import IngestSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_stepfunctions import SFNClient


class S3DatasetStore:
    def __init__(self, client: S3Client) -> None:
        self._client = client

    def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        return list_objects(self._client, bucket, prefix)

    def reader(self, bucket: str) -> ObjectReader:
        return S3ObjectReader(self._client, bucket)


class StepFunctionsStarter:
    def __init__(self, client: SFNClient, state_machine_arn: str) -> None:
        self._client = client
        self._state_machine_arn = state_machine_arn

    def start(self, execution_input: ExecutionInput) -> str:
        """Start the execution named after the job; one that already exists counts as started."""
        try:
            response = self._client.start_execution(
                stateMachineArn=self._state_machine_arn,
                name=execution_input.job_id,
                input=execution_input.model_dump_json(),
            )
            return response["executionArn"]
        except self._client.exceptions.ExecutionAlreadyExists:
            return self.execution_arn(execution_input.job_id)

    def execution_arn(self, name: str) -> str:
        # arn:aws:states:<region>:<account>:stateMachine:<sm> -> ...:execution:<sm>:<name>
        return self._state_machine_arn.replace(":stateMachine:", ":execution:", 1) + f":{name}"


def build_ingestor(settings: IngestSettings) -> Ingestor:
    # Validation reads images on READ_THREADS threads through this one client: one pooled connection each.
    s3 = boto3.client("s3", config=Config(max_pool_connections=READ_THREADS))
    return Ingestor(
        repository=JobRepository(boto3.resource("dynamodb").Table(settings.jobs_table)),
        notifier=Notifier(boto3.client("sns"), settings.notification_topic_arn),
        store=S3DatasetStore(s3),
        executions=StepFunctionsStarter(boto3.client("stepfunctions"), settings.state_machine_arn),
        settle_seconds=settings.settle_seconds,
        default_base_model=settings.default_base_model,
    )
