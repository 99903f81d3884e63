"""Job control's boto3 adapters against moto (Step Functions, S3, SQS) and botocore's Stubber (SageMaker's
StopTrainingJob, which moto 5.2.5 does not implement)."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber
from jobs_aws import REGION, new_job
from loraflow_ingest.events import DatasetRef, S3Notification, datasets_in
from loraflow_shared.contracts import ExecutionInput
from loraflow_shared.jobs.control_aws import (
    QueueRevalidation,
    S3PreviewCancellations,
    SageMakerTrainingJobs,
    StepFunctionsExecutions,
)
from loraflow_shared.jobs.model import preview_cancel_key

JOB_ID = "b" * 24


@pytest.fixture
def state_machine_arn(aws: None) -> str:
    definition = {"StartAt": "Wait", "States": {"Wait": {"Type": "Wait", "Seconds": 600, "End": True}}}
    return boto3.client("stepfunctions", region_name=REGION).create_state_machine(
        name="pipeline", definition=json.dumps(definition), roleArn="arn:aws:iam::123456789012:role/sfn"
    )["stateMachineArn"]


def _input(attempt: int) -> ExecutionInput:
    return ExecutionInput(
        job_id=JOB_ID,
        attempt=attempt,
        dataset="0001 my set",
        dataset_s3_uri="s3://datasets/0001 my set/",
        config_file="c.toml",
        base_model="m",
    )


def test_given_attempts_when_started_then_one_named_execution_each_and_a_repeat_is_the_same(
    state_machine_arn: str,
) -> None:
    client = boto3.client("stepfunctions", region_name=REGION)
    executions = StepFunctionsExecutions(client, state_machine_arn)

    first = executions.start(_input(1))
    again = executions.start(_input(1))
    second = executions.start(_input(2))

    assert first == again != second
    described = client.describe_execution(executionArn=second)
    assert described["name"] == f"{JOB_ID}-2"
    assert json.loads(described["input"])["attempt"] == 2


def test_given_running_execution_when_stopped_then_aborted_and_an_unknown_one_is_ignored(
    state_machine_arn: str,
) -> None:
    client = boto3.client("stepfunctions", region_name=REGION)
    executions = StepFunctionsExecutions(client, state_machine_arn)
    arn = executions.start(_input(1))

    executions.stop(arn, cause="cancelled")
    executions.stop(executions.execution_arn("never-started"), cause="cancelled")

    assert client.describe_execution(executionArn=arn)["status"] == "ABORTED"


def _stubbed_sagemaker(error_code: str) -> tuple[Any, Stubber]:
    client = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    stubber = Stubber(client)
    stubber.add_client_error("stop_training_job", service_error_code=error_code, http_status_code=400)
    return client, stubber


def test_given_training_job_already_ended_when_stopped_then_nothing_to_do() -> None:
    client, stubber = _stubbed_sagemaker("ValidationException")
    with stubber:
        SageMakerTrainingJobs(client).stop(f"loraflow-{JOB_ID}-1-1")
    stubber.assert_no_pending_responses()


def test_given_throttled_stop_when_stopped_then_the_error_surfaces() -> None:
    client, stubber = _stubbed_sagemaker("ThrottlingException")
    with stubber, pytest.raises(ClientError):
        SageMakerTrainingJobs(client).stop(f"loraflow-{JOB_ID}-1-1")


def test_given_render_to_cancel_when_cancelled_then_marker_at_the_renderers_key(aws: None) -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="artifacts")

    S3PreviewCancellations(s3, "artifacts").cancel(f"{JOB_ID}-3")

    s3.head_object(Bucket="artifacts", Key=preview_cancel_key(f"{JOB_ID}-3"))


def test_given_job_to_revalidate_when_requested_then_ingest_reads_its_dataset_from_the_message(
    aws: None,
) -> None:
    sqs = boto3.client("sqs", region_name=REGION)
    url = sqs.create_queue(QueueName="uploads", Attributes={"DelaySeconds": "60"})["QueueUrl"]
    job = new_job(JOB_ID, dataset="0001 my+set").model_copy(
        update={"dataset_s3_uri": "s3://datasets/0001 my+set/"}
    )

    QueueRevalidation(sqs, url).request(job)

    # Delivered at once, despite the queue's settle delay.
    [message] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)["Messages"]
    notification = S3Notification.model_validate_json(message["Body"])
    assert datasets_in(notification) == ({DatasetRef("datasets", "0001 my+set")}, [])
