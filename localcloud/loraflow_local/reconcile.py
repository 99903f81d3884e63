"""After a restart: upload events that were still waiting in SQS when the cloud stopped are gone (queue
messages are not saved). Every bucket whose `s3:ObjectCreated:*` notifications go to an SQS queue gets one
synthetic S3 event per top-level folder (a dataset) sent to that queue, through the same path (and the
queue's delay) as a real upload. The receiver must be idempotent, as loraflow's ingest function is: a
dataset version that already has a job is recognised and not trained again.
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote_plus

LOG = logging.getLogger(__name__)


def requeue_uploads(s3: Any, sqs: Any, region: str) -> int:
    """Send each dataset folder's synthetic upload event; return how many were sent."""
    sent = 0
    for bucket in sorted(item["Name"] for item in s3.list_buckets()["Buckets"]):
        configuration = s3.get_bucket_notification_configuration(Bucket=bucket)
        targets = [item for item in configuration.get("QueueConfigurations", []) if _on_create(item)]
        if not targets:
            continue
        for listed in _folder_samples(s3, bucket):
            for target in targets:
                if _passes_filter(listed["Key"], target):
                    body = json.dumps(s3_created_event(bucket, listed, region, target.get("Id", "")))
                    sqs.send_message(QueueUrl=_queue_url(sqs, target["QueueArn"]), MessageBody=body)
                    sent += 1
    LOG.info("re-sent %d upload events after the restart", sent)
    return sent


def s3_created_event(
    bucket: str, listed: Mapping[str, Any], region: str, configuration_id: str
) -> dict[str, Any]:
    """S3's `ObjectCreated:Put` notification for one listed object (its key `quote_plus`-encoded)."""
    now = datetime.datetime.now(datetime.UTC)
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": region,
                "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
                "eventName": "ObjectCreated:Put",
                "userIdentity": {"principalId": "loraflow-local-restart"},
                "requestParameters": {"sourceIPAddress": "127.0.0.1"},
                "responseElements": {"x-amz-request-id": uuid.uuid4().hex[:16].upper()},
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": configuration_id,
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {
                        "key": quote_plus(listed["Key"], safe="/"),
                        "size": listed["Size"],
                        "eTag": listed["ETag"].strip('"'),
                        "sequencer": f"{int(now.timestamp() * 1e6):016X}",
                    },
                },
            }
        ]
    }


def _on_create(configuration: Mapping[str, Any]) -> bool:
    return any(event.startswith("s3:ObjectCreated:") for event in configuration.get("Events", []))


def _folder_samples(s3: Any, bucket: str) -> Iterator[dict[str, Any]]:
    """One object (the first listed) under each top-level prefix `<folder>/` of the bucket."""
    folders = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Delimiter="/")
    for page in folders:
        for common in page.get("CommonPrefixes", []):
            listed = s3.list_objects_v2(Bucket=bucket, Prefix=common["Prefix"], MaxKeys=1).get("Contents", [])
            if listed:
                yield listed[0]


def _passes_filter(key: str, configuration: Mapping[str, Any]) -> bool:
    rules = ((configuration.get("Filter") or {}).get("Key") or {}).get("FilterRules") or []
    for rule in rules:
        name, value = rule["Name"].lower(), rule["Value"]
        if (name == "prefix" and not key.startswith(value)) or (name == "suffix" and not key.endswith(value)):
            return False
    return True


def _queue_url(sqs: Any, queue_arn: str) -> str:
    _, _, _, _, account, name = queue_arn.split(":", 5)
    return str(sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"])
