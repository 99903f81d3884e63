"""The preview callback and attempts (a result of an attempt the job moved on from is ignored), and its
failure queue: results the callback could not process fail the waiting task at once."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from functions_aws import REGION, Cloud, FakeLambdaContext, claim_job, create_cloud, load_event
from loraflow_callback import app
from loraflow_callback.adapters import build_callback
from loraflow_callback.events import AsyncInferenceNotification
from loraflow_callback.logic import Outcome, PreviewCallback
from loraflow_callback.settings import CallbackSettings
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.model import Attempt, JobStatus, execution_name
from loraflow_shared.jobs.repository import JobRepository
from moto import mock_aws
from test_callback_handler import JOB_ID, RESPONSE, WaitingExecution, notification_location, put

FAILURE_QUEUE_ARN = f"arn:aws:sqs:{REGION}:123456789012:loraflow-PreviewCallbackFailureQueue"
CALLBACK_ARN = f"arn:aws:lambda:{REGION}:123456789012:function:loraflow-PreviewCallback"


@pytest.fixture
def cloud(aws_env: None) -> Iterator[Cloud]:
    """moto with Step Functions executing for real, so task tokens can be completed."""
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        yield create_cloud()


@pytest.fixture
def sent(cloud: Cloud) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """SendTaskSuccess/SendTaskFailure requests as they leave boto3 (moto 5.2.5 drops `cause`)."""
    calls: list[tuple[str, dict[str, Any]]] = []
    handlers = {}
    session = boto3._get_default_session()
    for operation in ("SendTaskSuccess", "SendTaskFailure"):

        def record(params: dict[str, Any], _operation: str = operation, **_: Any) -> None:
            calls.append((_operation, dict(params)))

        handlers[f"provide-client-params.sfn.{operation}"] = record
    for event, handler in handlers.items():
        session.events.register(event, handler)
    yield calls
    for event, handler in handlers.items():
        session.events.unregister(event, handler)


@pytest.fixture
def callback(cloud: Cloud, sent: list[tuple[str, dict[str, Any]]]) -> PreviewCallback:
    return build_callback(CallbackSettings.from_environ(cloud.env()))


def waiting_job(cloud: Cloud, token: str, attempt: int) -> None:
    """The job waits for its previews with `token`, in `attempt` (earlier ones were cancelled, retried)."""
    repository = JobRepository(cloud.table)
    claim_job(
        repository,
        JOB_ID,
        [JobStatus.QUEUED, JobStatus.TRAINING],
        dataset_s3_uri="s3://loraflow-datasets/0001-dataset/",
    )
    for number in range(2, attempt + 1):
        job = repository.transition(
            JOB_ID,
            JobStatus.CANCELLED,
            if_attempt=number - 1,
            errors=[Problem(code=ErrorCode.CANCELLED, path="", message="cancelled by request")],
        )
        again = Attempt(
            number=number, execution_name=execution_name(JOB_ID, number), started_at=job.updated_at
        )
        repository.transition(
            JOB_ID, JobStatus.QUEUED, if_attempt=number - 1, attempt=number, attempts=[*job.attempts, again]
        )
        repository.transition(JOB_ID, JobStatus.TRAINING, if_attempt=number)
    repository.transition(JOB_ID, JobStatus.GENERATING_PREVIEWS, if_attempt=attempt, preview_task_token=token)


def success_event(inference_id: str) -> dict[str, Any]:
    """The endpoint's success notification for `inference_id`, its output already written."""
    event = copy.deepcopy(load_event("sns_async_inference_success.json"))
    message = json.loads(event["Records"][0]["Sns"]["Message"])
    message["inferenceId"] = inference_id
    event["Records"][0]["Sns"]["Message"] = json.dumps(message)
    put(notification_location(event, "outputLocation"), json.dumps(RESPONSE))
    return event


def notification_in(event: dict[str, Any]) -> AsyncInferenceNotification:
    return AsyncInferenceNotification.model_validate_json(event["Records"][0]["Sns"]["Message"])


def token_of_job(cloud: Cloud) -> str | None:
    return JobRepository(cloud.table).require(JOB_ID).preview_task_token


def test_given_job_runs_attempt_2_when_attempt_1_result_arrives_then_stale_and_token_untouched(
    cloud: Cloud,
    callback: PreviewCallback,
    context: FakeLambdaContext,
    sent: list[tuple[str, dict[str, Any]]],
) -> None:
    execution = WaitingExecution()
    waiting_job(cloud, execution.token, attempt=2)
    late = success_event(f"{JOB_ID}-1")

    outcome = callback.handle(notification_in(late))
    app.lambda_handler(late, context, callback=callback)  # the handler drops it too, without error

    assert outcome is Outcome.STALE_ATTEMPT
    assert sent == []
    assert token_of_job(cloud) == execution.token
    # The token still completes attempt 2's own result.
    assert callback.handle(notification_in(success_event(f"{JOB_ID}-2"))) is Outcome.SUCCEEDED
    assert execution.finished()["status"] == "SUCCEEDED"


def test_given_bare_job_id_as_inference_id_when_result_arrives_then_it_completes_attempt_1(
    cloud: Cloud, callback: PreviewCallback, sent: list[tuple[str, dict[str, Any]]]
) -> None:
    execution = WaitingExecution()
    waiting_job(cloud, execution.token, attempt=1)

    # Requests sent before attempts were counted carry the bare job id.
    outcome = callback.handle(notification_in(success_event(JOB_ID)))

    assert outcome is Outcome.SUCCEEDED
    assert [(name, params["taskToken"]) for name, params in sent] == [("SendTaskSuccess", execution.token)]
    assert execution.finished()["status"] == "SUCCEEDED"


def sqs_event(*bodies: str) -> dict[str, Any]:
    """A batch of the callback's failure queue, as Lambda's SQS event source delivers it."""
    return {
        "Records": [
            {
                "messageId": f"failure-{index}",
                "receiptHandle": f"handle-{index}",
                "body": body,
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1736935400000"},
                "messageAttributes": {},
                "md5OfBody": "0" * 32,
                "eventSource": "aws:sqs",
                "eventSourceARN": FAILURE_QUEUE_ARN,
                "awsRegion": REGION,
            }
            for index, body in enumerate(bodies)
        ]
    }


def destination_record(sns_event: dict[str, Any], error_type: str, error_message: str) -> str:
    """Lambda's OnFailure destination record for an asynchronous invocation that failed every try."""
    return json.dumps(
        {
            "version": "1.0",
            "timestamp": "2025-01-15T10:45:00.000Z",
            "requestContext": {
                "requestId": "e4b46cbf-b738-xmpl-8880-a18cdf61200e",
                "functionArn": f"{CALLBACK_ARN}:$LATEST",
                "condition": "RetriesExhausted",
                "approximateInvokeCount": 3,
            },
            "requestPayload": sns_event,
            "responseContext": {
                "statusCode": 200,
                "executedVersion": "$LATEST",
                "functionError": "Unhandled",
            },
            "responsePayload": {
                "errorMessage": error_message,
                "errorType": error_type,
                "requestId": "e4b46cbf-b738-xmpl-8880-a18cdf61200e",
                "stackTrace": ['  File "/var/task/app.py", line 40, in _handle_sns\n'],
            },
        }
    )


def sns_redrive_message(sns_event: dict[str, Any]) -> str:
    """What an SNS subscription's redrive policy puts in the queue: the SNS message with its envelope."""
    envelope = {key: value for key, value in sns_event["Records"][0]["Sns"].items() if key != "Subject"}
    return json.dumps(envelope)


def test_given_callback_failed_every_try_when_destination_record_arrives_then_task_fails_naming_the_error(
    cloud: Cloud,
    callback: PreviewCallback,
    context: FakeLambdaContext,
    sent: list[tuple[str, dict[str, Any]]],
) -> None:
    execution = WaitingExecution()
    waiting_job(cloud, execution.token, attempt=1)
    record = destination_record(
        load_event("sns_async_inference_success.json"), "ReadTimeoutError", "Read timeout on endpoint URL"
    )

    response = app.lambda_handler(sqs_event(record), context, callback=callback)

    assert response == {"batchItemFailures": []}
    finished = execution.finished()
    assert (finished["status"], finished["error"]) == ("FAILED", "PREVIEW_FAILED")
    [(operation, params)] = sent
    assert (operation, params["error"], params["taskToken"]) == (
        "SendTaskFailure",
        "PREVIEW_FAILED",
        execution.token,
    )
    assert "ReadTimeoutError: Read timeout on endpoint URL" in params["cause"]


def test_given_sns_could_not_deliver_when_redriven_message_arrives_then_task_fails_saying_so(
    cloud: Cloud,
    callback: PreviewCallback,
    context: FakeLambdaContext,
    sent: list[tuple[str, dict[str, Any]]],
) -> None:
    execution = WaitingExecution()
    waiting_job(cloud, execution.token, attempt=1)
    message = sns_redrive_message(load_event("sns_async_inference_failure.json"))

    response = app.lambda_handler(sqs_event(message), context, callback=callback)

    assert response == {"batchItemFailures": []}
    assert execution.finished()["error"] == "PREVIEW_FAILED"
    [(operation, params)] = sent
    assert (operation, params["error"]) == ("SendTaskFailure", "PREVIEW_FAILED")
    assert "SNS could not deliver" in params["cause"]


def test_given_bare_job_id_in_failure_queue_while_attempt_2_waits_when_handled_then_stale_and_ignored(
    cloud: Cloud,
    callback: PreviewCallback,
    context: FakeLambdaContext,
    sent: list[tuple[str, dict[str, Any]]],
) -> None:
    waiting_job(cloud, "token-of-attempt-2", attempt=2)
    sns_event = load_event("sns_async_inference_success.json")  # inference id: the bare job id

    response = app.lambda_handler(
        sqs_event(destination_record(sns_event, "Exception", "boom")), context, callback=callback
    )

    assert response == {"batchItemFailures": []}
    assert sent == []
    assert token_of_job(cloud) == "token-of-attempt-2"


UNPARSABLE = [
    "not json at all",
    "[]",
    '{"Type": "Notification", "Message": "{\\"inferenceId\\": 7}"}',
    '{"requestPayload": {"Records": [{"Sns": {"Message": "not json"}}]}}',
    '{"requestPayload": "not an event"}',
]


def test_given_unparsable_failure_messages_when_handled_then_only_they_are_reported_as_batch_failures(
    cloud: Cloud,
    callback: PreviewCallback,
    context: FakeLambdaContext,
    sent: list[tuple[str, dict[str, Any]]],
) -> None:
    waiting_job(cloud, "a-token-no-execution-waits-for", attempt=1)
    good = sns_redrive_message(load_event("sns_async_inference_failure.json"))

    response = app.lambda_handler(sqs_event(good, *UNPARSABLE), context, callback=callback)

    failed = [item["itemIdentifier"] for item in response["batchItemFailures"]]
    assert failed == [f"failure-{index}" for index in range(1, len(UNPARSABLE) + 1)]
    assert [name for name, _ in sent] == ["SendTaskFailure"]  # the good one was still handled
