"""The SQS event source mapping emulation against a moto queue, with an in-process handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from loraflow_local.lambda_runtime import FunctionSpec
from loraflow_local.provision_context import SqsMapping
from loraflow_local.services import LocalServices
from loraflow_local.sqs_poller import SqsPoller

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(client: Callable[[str], Any]) -> tuple[str, str]:
    sqs = client("sqs")
    url = sqs.create_queue(QueueName="uploads", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def _poller(
    services: LocalServices, queue: tuple[str, str], handler: str, report_failures: bool
) -> SqsPoller:
    services.lambdas.register(
        FunctionSpec(name="consumer", arn="arn:consumer", handler=handler, code_paths=(), timeout_s=30)
    )
    mapping = SqsMapping(
        "consumer", queue[1], queue[0], batch_size=10, report_batch_item_failures=report_failures
    )
    return SqsPoller(mapping, services.lambdas, "us-east-1")


def _remaining(client: Callable[[str], Any], url: str) -> int:
    attributes = client("sqs").get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


def test_given_messages_when_polled_then_one_lambda_sqs_event_and_all_deleted(
    services: LocalServices, client: Callable[[str], Any], queue: tuple[str, str], recorded_events: list[Any]
):
    url, arn = queue
    for body in ("one", "two"):
        client("sqs").send_message(
            QueueUrl=url,
            MessageBody=body,
            MessageAttributes={"kind": {"DataType": "String", "StringValue": "x"}},
        )
    poller = _poller(services, queue, "loraflow_local_test_handlers.record", report_failures=False)
    assert poller.poll_once() == 2
    (event,) = recorded_events
    records = event["Records"]
    assert sorted(record["body"] for record in records) == ["one", "two"]
    first = records[0]
    assert (first["eventSource"], first["eventSourceARN"], first["awsRegion"]) == (
        "aws:sqs",
        arn,
        "us-east-1",
    )
    assert first["messageAttributes"]["kind"]["stringValue"] == "x"
    assert first["attributes"]["ApproximateReceiveCount"] == "1"
    assert first["md5OfBody"] and first["receiptHandle"]
    assert _remaining(client, url) == 0


def test_given_reported_item_failures_when_polled_then_only_failed_messages_stay(
    services: LocalServices, client: Callable[[str], Any], queue: tuple[str, str], recorded_events: list[Any]
):
    url, _ = queue
    for body in ("good", "bad", "good"):
        client("sqs").send_message(QueueUrl=url, MessageBody=body)
    poller = _poller(services, queue, "loraflow_local_test_handlers.partial_batch", report_failures=True)
    assert poller.poll_once() == 3
    assert _remaining(client, url) == 1


def test_given_handler_error_when_polled_then_whole_batch_stays(
    services: LocalServices, client: Callable[[str], Any], queue: tuple[str, str]
):
    url, _ = queue
    client("sqs").send_message(QueueUrl=url, MessageBody="x")
    poller = _poller(services, queue, "loraflow_local_test_handlers.fail", report_failures=True)
    assert poller.poll_once() == 1
    assert _remaining(client, url) == 1


def test_given_running_poller_when_message_arrives_then_processed_and_stop_is_prompt(
    services: LocalServices,
    client: Callable[[str], Any],
    queue: tuple[str, str],
    recorded_events: list[Any],
    wait_for: Callable[..., Any],
):
    poller = _poller(services, queue, "loraflow_local_test_handlers.record", report_failures=False)
    poller.start()
    try:
        client("sqs").send_message(QueueUrl=queue[0], MessageBody="late")
        wait_for(lambda: recorded_events)
    finally:
        poller.stop()
    assert recorded_events[0]["Records"][0]["body"] == "late"
    assert not poller._thread.is_alive()
