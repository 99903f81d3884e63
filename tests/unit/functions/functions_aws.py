"""moto resources and generated datasets for the Lambda handler tests.

The jobs table is built from template.yaml's own declaration, so the tests follow the deployment.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
from aws_lambda_powertools.utilities.typing import LambdaContext
from cfnlint.decode import decode
from loraflow_shared.jobs.model import Attempt, Job, JobStatus, execution_name
from loraflow_shared.jobs.repository import JobRepository
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[3]
EVENTS = REPO_ROOT / "events"
REGION = "us-east-1"
ACCOUNT = "123456789012"
DATASET_BUCKET = "loraflow-datasets"
ARTIFACTS_BUCKET = "loraflow-artifacts"
ENDPOINT_NAME = "loraflow-preview"
LARGE_MODEL_ENDPOINT_NAME = "loraflow-preview-large"
DEFAULT_BASE_MODEL = "s3://loraflow-artifacts/base-models/tiny-sd/"
CONFIG = b"""
pretrained_model_name_or_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"
resolution = "64,64"
max_train_steps = 2
xformers = true

[loraflow]
preview_steps = 3
"""


@contextmanager
def sent_requests(operation: str) -> Iterator[list[dict[str, Any]]]:
    """The parameters of each `operation` request (e.g. `sagemaker-runtime.InvokeEndpointAsync`) as they
    leave boto3: what moto does not keep (timeouts, ids) or drops (SendTaskFailure's cause)."""
    sent: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(dict(params))

    session = boto3._get_default_session()
    session.events.register(f"provide-client-params.{operation}", record)
    try:
        yield sent
    finally:
        session.events.unregister(f"provide-client-params.{operation}", record)


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return event


@cache
def _jobs_table_properties() -> dict[str, Any]:
    template, errors = decode(str(REPO_ROOT / "template.yaml"))
    assert template is not None, errors
    properties = template["Resources"]["JobsTable"]["Properties"]
    keys = ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes", "BillingMode")
    return {key: properties[key] for key in keys}


def png(seed: int = 0, size: int = 64) -> bytes:
    """A small noisy RGB PNG (validation reads its header and tail)."""
    pixels = bytes((seed * 31 + index * 7) % 256 for index in range(size * size * 3))
    buffer = BytesIO()
    Image.frombytes("RGB", (size, size), pixels).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Cloud:
    """What the handlers talk to, created in moto."""

    table: Any
    topic_arn: str
    inbox_url: str  # an SQS queue subscribed to the notification topic
    state_machine_arn: str
    upload_queue_url: str  # the ingest function's queue (a retry before validation ended sends to it)

    def env(self) -> dict[str, str]:
        return {
            "JOBS_TABLE": self.table.name,
            "NOTIFICATION_TOPIC_ARN": self.topic_arn,
            "STATE_MACHINE_ARN": self.state_machine_arn,
            "SETTLE_SECONDS": "0",
            "DEFAULT_BASE_MODEL": DEFAULT_BASE_MODEL,
            "ARTIFACTS_BUCKET": ARTIFACTS_BUCKET,
            "PREVIEW_ENDPOINT_NAME": ENDPOINT_NAME,
            "LARGE_MODEL_PREVIEW_ENDPOINT_NAME": LARGE_MODEL_ENDPOINT_NAME,
            "TRAINING_INSTANCE_TYPE": "ml.g5.2xlarge",
            "LARGE_MODEL_FAMILIES": "true",
            "LARGE_MODEL_TRAINING_INSTANCE_TYPE": "ml.g6e.2xlarge",
            "URL_EXPIRY_SECONDS": "600",
            "PREVIEW_TIMEOUT_SECONDS": "3600",
            "CAPACITY_WAIT_SECONDS": "3600",
            "TRAINING_PRICES_PER_HOUR": "ml.g5.2xlarge=1.515,ml.g5.xlarge=1.408",
            "UPLOAD_QUEUE_URL": self.upload_queue_url,
        }

    def notifications(self) -> list[dict[str, Any]]:
        """Messages published so far (SNS envelopes with `Message` and `MessageAttributes`)."""
        sqs = boto3.client("sqs", region_name=REGION)
        found: list[dict[str, Any]] = []
        while True:
            batch = sqs.receive_message(QueueUrl=self.inbox_url, MaxNumberOfMessages=10).get("Messages", [])
            if not batch:
                return found
            for message in batch:
                found.append(json.loads(message["Body"]))
                sqs.delete_message(QueueUrl=self.inbox_url, ReceiptHandle=message["ReceiptHandle"])


def create_cloud() -> Cloud:
    dynamodb = boto3.resource("dynamodb", region_name=REGION)
    table = dynamodb.create_table(TableName="loraflow-jobs", **_jobs_table_properties())
    s3 = boto3.client("s3", region_name=REGION)
    for bucket in (DATASET_BUCKET, ARTIFACTS_BUCKET):
        s3.create_bucket(Bucket=bucket)
    sns, sqs = boto3.client("sns", region_name=REGION), boto3.client("sqs", region_name=REGION)
    topic_arn = sns.create_topic(Name="loraflow-notifications")["TopicArn"]
    inbox_url = sqs.create_queue(QueueName="inbox")["QueueUrl"]
    inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=inbox_arn)
    state_machine_arn = boto3.client("stepfunctions", region_name=REGION).create_state_machine(
        name="loraflow-pipeline",
        definition=json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Pass", "End": True}}}),
        roleArn=f"arn:aws:iam::{ACCOUNT}:role/loraflow-pipeline",
    )["stateMachineArn"]
    upload_queue_url = sqs.create_queue(QueueName="uploads")["QueueUrl"]
    return Cloud(table, topic_arn, inbox_url, state_machine_arn, upload_queue_url)


def upload_dataset(dataset: str, files: dict[str, bytes]) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    for relative, body in files.items():
        s3.put_object(Bucket=DATASET_BUCKET, Key=f"{dataset}/{relative}", Body=body)


def upload_model_index(folder_uri: str, class_name: str) -> None:
    """A diffusers folder's model_index.json (all that ingest reads of a base model)."""
    bucket, _, prefix = folder_uri.removeprefix("s3://").partition("/")
    body = json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}).encode()
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=bucket, Key=f"{prefix}model_index.json", Body=body
    )


def valid_dataset_files() -> dict[str, bytes]:
    return {
        "config.toml": CONFIG,
        "20_zqxj dog/img 1.png": png(1),
        "20_zqxj dog/img 1.txt": b"zqxj dog on a sofa",
        "20_zqxj dog/img 2.png": png(2),
    }


class FakeLambdaContext(LambdaContext):
    """A Lambda context with the values Powertools' Logger reads."""

    def __init__(self) -> None:
        self._function_name = "test-function"
        self._function_version = "$LATEST"
        self._memory_limit_in_mb = 256
        self._invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:test-function"
        self._aws_request_id = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
        self._log_group_name = "/aws/lambda/test-function"
        self._log_stream_name = "2025/01/15/[$LATEST]abcdef"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 60_000


def claim_job(repository: JobRepository, job_id: str, statuses: Iterable[JobStatus], **fields: Any) -> Job:
    """Claim a job of dataset 0001-dataset (VALIDATING); move it through `statuses` as the pipeline does
    (attempt 1 is recorded when it is queued, as ingest does)."""
    now, statuses = repository.now(), list(statuses)
    if JobStatus.QUEUED in statuses:
        first = Attempt(number=1, execution_name=execution_name(job_id, 1), started_at=now)
        fields = {"attempts": [first], **fields}
    repository.claim(
        Job(
            job_id=job_id,
            dataset="0001-dataset",
            status=JobStatus.VALIDATING,
            created_at=now,
            updated_at=now,
            fingerprint="f" * 64,
            **fields,
        )
    )
    for status in statuses:
        repository.transition(job_id, status)
    return repository.require(job_id)
