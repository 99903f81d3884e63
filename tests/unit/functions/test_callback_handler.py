from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from functions_aws import (
    ACCOUNT,
    ARTIFACTS_BUCKET,
    REGION,
    Cloud,
    FakeLambdaContext,
    claim_job,
    create_cloud,
    load_event,
    sent_requests,
)
from loraflow_callback import app
from loraflow_callback.adapters import build_callback
from loraflow_callback.logic import PreviewCallback
from loraflow_callback.settings import CallbackSettings
from loraflow_shared.jobs.model import JobStatus
from loraflow_shared.jobs.repository import JobRepository
from moto import mock_aws

JOB_ID = "4f1c2a9e0b7d3c5a6e8f1029"
RESPONSE = {
    "job_id": JOB_ID,
    "previews": [
        {
            "prompt": "zqxj dog",
            "s3_uri": f"s3://{ARTIFACTS_BUCKET}/p/0.png",
            "base_s3_uri": f"s3://{ARTIFACTS_BUCKET}/p/base-0.png",
        }
    ],
    "contact_sheet_s3_uri": f"s3://{ARTIFACTS_BUCKET}/p/contact-sheet.png",
}


@pytest.fixture
def cloud(aws_env: None) -> Iterator[Cloud]:
    """moto with Step Functions executing for real, so task tokens can be completed."""
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        yield create_cloud()


@pytest.fixture
def sent_failures(cloud: Cloud) -> Iterator[list[dict[str, Any]]]:
    """SendTaskFailure requests as they leave boto3 (moto 5.2.5 drops `cause` when it answers them)."""
    with sent_requests("sfn.SendTaskFailure") as sent:
        yield sent


@pytest.fixture
def callback(cloud: Cloud, sent_failures: list[dict[str, Any]]) -> PreviewCallback:
    return build_callback(CallbackSettings.from_environ(cloud.env()))


class WaitingExecution:
    """An execution parked on a `.waitForTaskToken` task, like GeneratePreviews in the real pipeline."""

    def __init__(self) -> None:
        sqs, sfn = boto3.client("sqs", region_name=REGION), boto3.client("stepfunctions", region_name=REGION)
        queue_url = sqs.create_queue(QueueName="tokens")["QueueUrl"]
        definition = {
            "StartAt": "GeneratePreviews",
            "States": {
                "GeneratePreviews": {
                    "Type": "Task",
                    "Resource": "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
                    "Parameters": {"QueueUrl": queue_url, "MessageBody": {"token.$": "$$.Task.Token"}},
                    "End": True,
                }
            },
        }
        machine = sfn.create_state_machine(
            name="waits", definition=json.dumps(definition), roleArn=f"arn:aws:iam::{ACCOUNT}:role/sfn"
        )
        self.arn = sfn.start_execution(stateMachineArn=machine["stateMachineArn"], name=JOB_ID)[
            "executionArn"
        ]
        self.token = self._token(sqs, queue_url)

    @staticmethod
    def _token(sqs: Any, queue_url: str) -> str:
        for _ in range(100):
            messages = sqs.receive_message(QueueUrl=queue_url).get("Messages", [])
            if messages:
                token: str = json.loads(messages[0]["Body"])["token"]
                return token
            time.sleep(0.05)
        raise AssertionError("the execution never reached its waiting task")

    def finished(self) -> dict[str, Any]:
        sfn = boto3.client("stepfunctions", region_name=REGION)
        for _ in range(100):
            described = dict(sfn.describe_execution(executionArn=self.arn))
            if described["status"] != "RUNNING":
                return described
            time.sleep(0.05)
        raise AssertionError("the execution is still waiting")


def job_waiting_for_previews(cloud: Cloud, token: str | None) -> None:
    repository = JobRepository(cloud.table)
    statuses = (JobStatus.QUEUED, JobStatus.TRAINING)
    claim_job(repository, JOB_ID, statuses, dataset_s3_uri="s3://loraflow-datasets/0001-dataset/")
    repository.transition(JOB_ID, JobStatus.GENERATING_PREVIEWS, preview_task_token=token)


def put(uri: str, body: str) -> None:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    boto3.client("s3", region_name=REGION).put_object(Bucket=bucket, Key=key, Body=body.encode())


def notification_location(event: dict[str, Any], field: str) -> str:
    location: str = json.loads(event["Records"][0]["Sns"]["Message"])["responseParameters"][field]
    return location


def test_given_rendered_previews_when_success_notified_then_waiting_task_succeeds_with_response(
    cloud: Cloud, callback: PreviewCallback, context: FakeLambdaContext
) -> None:
    execution = WaitingExecution()
    job_waiting_for_previews(cloud, execution.token)
    event = load_event("sns_async_inference_success.json")
    put(notification_location(event, "outputLocation"), json.dumps(RESPONSE))

    app.lambda_handler(event, context, callback=callback)

    finished = execution.finished()
    assert finished["status"] == "SUCCEEDED"
    assert json.loads(finished["output"]) == RESPONSE


def test_given_server_error_body_when_failure_notified_then_task_fails_with_preview_failed(
    cloud: Cloud, callback: PreviewCallback, context: FakeLambdaContext, sent_failures: list[dict[str, Any]]
) -> None:
    execution = WaitingExecution()
    job_waiting_for_previews(cloud, execution.token)
    event = load_event("sns_async_inference_failure.json")
    server_body = json.dumps({"code": "MODEL_LOAD_FAILED", "message": "cannot load base model 'x'"})
    put(notification_location(event, "failureLocation"), server_body)

    app.lambda_handler(event, context, callback=callback)

    finished = execution.finished()
    assert (finished["status"], finished["error"]) == ("FAILED", "PREVIEW_FAILED")
    assert [(sent["error"], sent["cause"]) for sent in sent_failures] == [("PREVIEW_FAILED", server_body)]


def test_given_failure_without_failure_file_when_notified_then_cause_is_sagemaker_reason(
    cloud: Cloud, callback: PreviewCallback, context: FakeLambdaContext, sent_failures: list[dict[str, Any]]
) -> None:
    execution = WaitingExecution()
    job_waiting_for_previews(cloud, execution.token)
    event = load_event("sns_async_inference_failure.json")

    app.lambda_handler(event, context, callback=callback)

    reason = json.loads(event["Records"][0]["Sns"]["Message"])["failureReason"]
    assert execution.finished()["error"] == "PREVIEW_FAILED"
    assert [sent["cause"] for sent in sent_failures] == [reason]


def test_given_output_that_is_not_a_preview_response_when_success_notified_then_task_fails(
    cloud: Cloud, callback: PreviewCallback, context: FakeLambdaContext, sent_failures: list[dict[str, Any]]
) -> None:
    execution = WaitingExecution()
    job_waiting_for_previews(cloud, execution.token)
    event = load_event("sns_async_inference_success.json")
    put(notification_location(event, "outputLocation"), '{"unexpected": true}')

    app.lambda_handler(event, context, callback=callback)

    assert execution.finished()["error"] == "PREVIEW_FAILED"
    [sent] = sent_failures
    assert "not a preview response" in sent["cause"]


@pytest.mark.parametrize("token", [None, "a-token-no-execution-waits-for"])
def test_given_nothing_waits_for_the_job_when_notified_then_dropped_without_error(
    cloud: Cloud, callback: PreviewCallback, context: FakeLambdaContext, token: str | None
) -> None:
    job_waiting_for_previews(cloud, token)
    event = load_event("sns_async_inference_success.json")
    put(notification_location(event, "outputLocation"), json.dumps(RESPONSE))

    assert app.lambda_handler(event, context, callback=callback) is None
    assert JobRepository(cloud.table).require(JOB_ID).status is JobStatus.GENERATING_PREVIEWS


def test_given_unknown_inference_id_when_notified_then_dropped_without_error(
    cloud: Cloud, callback: PreviewCallback, context: FakeLambdaContext
) -> None:
    assert (
        app.lambda_handler(load_event("sns_async_inference_success.json"), context, callback=callback) is None
    )
    assert cloud.table.scan()["Items"] == []
