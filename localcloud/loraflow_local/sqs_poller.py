"""SQS event source mappings: one thread per mapping long-polls the queue and invokes the function in-process.

As Lambda does: a batch of up to BatchSize records per invocation; records of a successful invocation are
deleted; with ReportBatchItemFailures only the listed `batchItemFailures` stay; an error (raised or an
invalid response) leaves the whole batch to reappear after the visibility timeout.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Any

import boto3

from loraflow_local.lambda_runtime import LambdaRegistry
from loraflow_local.provision_context import SqsMapping

LOG = logging.getLogger(__name__)


class SqsPoller:
    def __init__(self, mapping: SqsMapping, lambdas: LambdaRegistry, region: str) -> None:
        self.mapping = mapping
        self._lambdas = lambdas
        self._region = region
        self._sqs: Any = boto3.client("sqs", region_name=region)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sqs-{mapping.function_name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Stop after the current poll (up to 1 s); `stop` waits for it."""
        self._stopped.set()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                self.poll_once()
            except Exception:  # the queue may be gone while stopping; otherwise log and keep polling
                if not self._stopped.is_set():
                    LOG.exception("polling %s failed", self.mapping.queue_url)
                    self._stopped.wait(1)

    def poll_once(self) -> int:
        """Receive one batch (waiting up to 1 s) and process it; return the number of records received."""
        response = self._sqs.receive_message(
            QueueUrl=self.mapping.queue_url,
            MaxNumberOfMessages=min(10, self.mapping.batch_size),
            WaitTimeSeconds=1,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = response.get("Messages", [])
        if messages:
            self._process(messages)
        return len(messages)

    def _process(self, messages: list[dict[str, Any]]) -> None:
        event = {"Records": [self._record(message) for message in messages]}
        result = self._lambdas.invoke(self.mapping.function_name, event)
        if result.errored:
            return  # the whole batch becomes visible again after the visibility timeout
        failed = self._failed_ids(result.payload, {message["MessageId"] for message in messages})
        if failed is None:
            return
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            self._sqs.delete_message_batch(
                QueueUrl=self.mapping.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
            )

    def _failed_ids(self, payload: str, received: set[str]) -> set[str] | None:
        """Ids to keep on the queue; None when the response is invalid (then the whole batch stays)."""
        if not self.mapping.report_batch_item_failures:
            return set()
        response = json.loads(payload) if payload else None
        if response in (None, {}) or (isinstance(response, dict) and not response.get("batchItemFailures")):
            return set()
        try:
            failed = {item["itemIdentifier"] for item in response["batchItemFailures"]}
        except (KeyError, TypeError):
            LOG.warning("%s returned a bad batch response: %s", self.mapping.function_name, payload[:200])
            return None
        if not failed <= received:
            LOG.warning("%s reported unknown message ids: %s", self.mapping.function_name, failed - received)
            return None
        return failed

    def _record(self, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "messageAttributes": {
                name: _lambda_message_attribute(value)
                for name, value in message.get("MessageAttributes", {}).items()
            },
            "md5OfBody": message["MD5OfBody"],
            "eventSource": "aws:sqs",
            "eventSourceARN": self.mapping.queue_arn,
            "awsRegion": self._region,
        }


def _lambda_message_attribute(value: dict[str, Any]) -> dict[str, Any]:
    """SQS API attribute shape → the Lambda event's lower-camel shape."""
    binary = value.get("BinaryValue")
    return {
        "stringValue": value.get("StringValue"),
        "binaryValue": base64.b64encode(binary).decode("ascii") if binary is not None else None,
        "stringListValues": value.get("StringListValues", []),
        "binaryListValues": value.get("BinaryListValues", []),
        "dataType": value["DataType"],
    }
