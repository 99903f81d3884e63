"""DynamoDB, SQS and SNS parts of a local cloud's saved state, each through its own API.

- DynamoDB: every table's items (and, for a table the template does not create, its keys and indexes).
- SQS: the queues users created (name and attributes; not their messages); the template's are provisioned.
- SNS: the topics and subscriptions users created (a queue subscribed to the notification topic, say); the
  template's own are provisioned again. "The template's" is what existed right after provisioning.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_QUEUE_ATTRIBUTES = (
    "DelaySeconds",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "Policy",
    "ReceiveMessageWaitTimeSeconds",
    "VisibilityTimeout",
    "FifoQueue",
    "ContentBasedDeduplication",
    "DeduplicationScope",
    "FifoThroughputLimit",
    "KmsMasterKeyId",
    "SqsManagedSseEnabled",
)
_QUEUE_LINKS = ("RedrivePolicy", "RedriveAllowPolicy")  # name other queues: set once all exist
_TOPIC_ATTRIBUTES = ("DisplayName", "FifoTopic", "ContentBasedDeduplication")
_SUBSCRIPTION_ATTRIBUTES = (
    "DeliveryPolicy",
    "FilterPolicy",
    "FilterPolicyScope",
    "RawMessageDelivery",
    "RedrivePolicy",
    "SubscriptionRoleArn",
)
_BATCH_WRITE_LIMIT = 25


@dataclass(frozen=True)
class Baseline:
    """What the template's provisioning created: not saved, since provisioning creates it again."""

    queue_names: frozenset[str]
    topic_arns: frozenset[str]
    subscriptions: frozenset[tuple[str, str, str]]  # (topic ARN, protocol, endpoint)

    @classmethod
    def capture(cls, sqs: Any, sns: Any) -> Baseline:
        return cls(
            queue_names=frozenset(_queue_names(sqs)),
            topic_arns=frozenset(_topic_arns(sns)),
            subscriptions=frozenset(_subscription_key(item) for item in _subscriptions(sns)),
        )


class DynamoDbSnapshot:
    name = "dynamodb"

    def __init__(self, dynamodb: Any) -> None:
        self._dynamodb = dynamodb

    def save(self, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        tables = {}
        for name in self._table_names():
            description = self._dynamodb.describe_table(TableName=name)["Table"]
            pages = self._dynamodb.get_paginator("scan").paginate(TableName=name, ConsistentRead=True)
            items = [_encode(item) for page in pages for item in page.get("Items", [])]
            tables[name] = {"schema": _table_schema(description), "items": items}
        return {"tables": tables}

    def restore(self, saved: Mapping[str, Any]) -> dict[str, int]:
        existing = set(self._table_names())
        count = 0
        for name, table in saved.get("tables", {}).items():
            if name not in existing:
                self._dynamodb.create_table(**table["schema"])
            items = [_decode(item) for item in table["items"]]
            for start in range(0, len(items), _BATCH_WRITE_LIMIT):
                self._write(name, items[start : start + _BATCH_WRITE_LIMIT])
            count += len(items)
        return {"items": count}

    def committed(self, saved: Mapping[str, Any]) -> None:
        pass

    def _write(self, table: str, items: list[dict[str, Any]]) -> None:
        requests: dict[str, Any] = {table: [{"PutRequest": {"Item": item}} for item in items]}
        while requests:
            requests = self._dynamodb.batch_write_item(RequestItems=requests).get("UnprocessedItems") or {}

    def _table_names(self) -> list[str]:
        pages = self._dynamodb.get_paginator("list_tables").paginate()
        return [name for page in pages for name in page.get("TableNames", [])]


class SqsSnapshot:
    name = "sqs"

    def __init__(self, sqs: Any, baseline: Baseline) -> None:
        self._sqs = sqs
        self._baseline = baseline

    def save(self, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        queues = {}
        for name in sorted(set(_queue_names(self._sqs)) - self._baseline.queue_names):
            url = self._sqs.get_queue_url(QueueName=name)["QueueUrl"]
            attributes = self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
            kept = _QUEUE_ATTRIBUTES + _QUEUE_LINKS
            queues[name] = {key: value for key, value in attributes.items() if key in kept}
        return {"queues": queues}

    def restore(self, saved: Mapping[str, Any]) -> dict[str, int]:
        queues: Mapping[str, Mapping[str, str]] = saved.get("queues", {})
        urls = {}
        for name, attributes in queues.items():
            plain = {key: value for key, value in attributes.items() if key not in _QUEUE_LINKS}
            urls[name] = self._sqs.create_queue(QueueName=name, Attributes=plain)["QueueUrl"]
        for name, attributes in queues.items():
            links = {key: value for key, value in attributes.items() if key in _QUEUE_LINKS}
            if links:
                self._sqs.set_queue_attributes(QueueUrl=urls[name], Attributes=links)
        return {"queues": len(queues)}

    def committed(self, saved: Mapping[str, Any]) -> None:
        pass


class SnsSnapshot:
    name = "sns"

    def __init__(self, sns: Any, baseline: Baseline) -> None:
        self._sns = sns
        self._baseline = baseline

    def save(self, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        topics = {}
        for arn in sorted(set(_topic_arns(self._sns)) - self._baseline.topic_arns):
            attributes = self._sns.get_topic_attributes(TopicArn=arn)["Attributes"]
            kept = {key: value for key, value in attributes.items() if key in _TOPIC_ATTRIBUTES}
            if kept.get("FifoTopic") != "true":  # FIFO settings only go with a FIFO topic
                kept = {key: value for key, value in kept.items() if key == "DisplayName"}
            topics[arn] = {"name": arn.rsplit(":", 1)[1], "attributes": kept}
        subscriptions = [
            self._saved_subscription(item)
            for item in _subscriptions(self._sns)
            if _subscription_key(item) not in self._baseline.subscriptions
        ]
        return {"topics": topics, "subscriptions": subscriptions}

    def restore(self, saved: Mapping[str, Any]) -> dict[str, int]:
        for topic in saved.get("topics", {}).values():
            self._sns.create_topic(Name=topic["name"], Attributes=topic["attributes"])
        present = {_subscription_key(item) for item in _subscriptions(self._sns)}
        subscriptions = saved.get("subscriptions", [])
        for item in subscriptions:
            if (item["topic"], item["protocol"], item["endpoint"]) in present:
                continue
            self._sns.subscribe(
                TopicArn=item["topic"],
                Protocol=item["protocol"],
                Endpoint=item["endpoint"],
                Attributes=item["attributes"],
                ReturnSubscriptionArn=True,
            )
        return {"topics": len(saved.get("topics", {})), "subscriptions": len(subscriptions)}

    def committed(self, saved: Mapping[str, Any]) -> None:
        pass

    def _saved_subscription(self, item: Mapping[str, str]) -> dict[str, Any]:
        arn = item["SubscriptionArn"]
        attributes = self._sns.get_subscription_attributes(SubscriptionArn=arn)["Attributes"]
        return {
            "topic": item["TopicArn"],
            "protocol": item["Protocol"],
            "endpoint": item["Endpoint"],
            "attributes": {
                key: value for key, value in attributes.items() if key in _SUBSCRIPTION_ATTRIBUTES
            },
        }


def _queue_names(sqs: Any) -> list[str]:
    pages = sqs.get_paginator("list_queues").paginate()
    return [url.rsplit("/", 1)[1] for page in pages for url in page.get("QueueUrls", [])]


def _topic_arns(sns: Any) -> list[str]:
    pages = sns.get_paginator("list_topics").paginate()
    return [topic["TopicArn"] for page in pages for topic in page.get("Topics", [])]


def _subscriptions(sns: Any) -> Iterable[Mapping[str, str]]:
    pages = sns.get_paginator("list_subscriptions").paginate()
    return [item for page in pages for item in page.get("Subscriptions", [])]


def _subscription_key(item: Mapping[str, str]) -> tuple[str, str, str]:
    return item["TopicArn"], item["Protocol"], item["Endpoint"]


def _table_schema(description: Mapping[str, Any]) -> dict[str, Any]:
    """CreateTable arguments for a table like the described one (billed on demand locally)."""
    schema: dict[str, Any] = {
        "TableName": description["TableName"],
        "KeySchema": description["KeySchema"],
        "AttributeDefinitions": description["AttributeDefinitions"],
        "BillingMode": "PAY_PER_REQUEST",
    }
    for kind in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        indexes = description.get(kind) or []
        if indexes:
            schema[kind] = [
                {key: index[key] for key in ("IndexName", "KeySchema", "Projection")} for index in indexes
            ]
    return schema


def _encode(value: Any) -> Any:
    """DynamoDB's typed JSON with binary values (bytes from boto3) as `{"__bytes__": base64}`."""
    if isinstance(value, bytes | bytearray):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes__"} and isinstance(value["__bytes__"], str):
            return base64.b64decode(value["__bytes__"])
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value
