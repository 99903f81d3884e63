"""A user's-eye client of a running stack: ordinary boto3 and HTTP against the endpoints in endpoints.json.

The demo and the end-to-end tests drive the local cloud only through this, exactly as a user would drive AWS.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
from loraflow_shared.jobs.model import TERMINAL_STATUSES as _TERMINAL

TERMINAL_STATUSES = frozenset(status.value for status in _TERMINAL)


class StackClient:
    def __init__(self, endpoints: Mapping[str, Any]) -> None:
        self.endpoints = dict(endpoints)
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=endpoints["region"]
        )
        self._session = session
        self.s3 = self.client("s3")
        self.sqs = self.client("sqs")
        self.sns = self.client("sns")

    def client(self, service: str) -> Any:
        """A boto3 client of any service of the stack's cloud (`AWS_ENDPOINT_URL` need not be set)."""
        return self._session.client(service, endpoint_url=self.endpoints["aws_endpoint_url"])  # type: ignore[call-overload]

    def upload_dataset(self, folder: Path, dataset_id: str, seed: int = 0) -> list[str]:
        """Upload every file under `folder` in a shuffled order, as `aws s3 sync` may; return the keys."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        random.Random(seed).shuffle(files)
        keys = []
        for path in files:
            key = f"{dataset_id}/{path.relative_to(folder).as_posix()}"
            self.s3.upload_file(str(path), self.endpoints["dataset_bucket"], key)
            keys.append(key)
        return keys

    def subscribe_notifications(self, queue_name: str) -> str:
        """Subscribe a fresh SQS queue to the notification topic; return its URL."""
        queue_url: str = self.sqs.create_queue(QueueName=queue_name)["QueueUrl"]
        queue = self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        arn = queue["Attributes"]["QueueArn"]
        self.sns.subscribe(
            TopicArn=self.endpoints["notification_topic_arn"],
            Protocol="sqs",
            Endpoint=arn,
            Attributes={"RawMessageDelivery": "true"},
        )
        return queue_url

    def next_notification(self, queue_url: str, timeout_s: float) -> dict[str, Any] | None:
        """The next notification body on the queue, or None after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            wait = int(max(1, min(5, deadline - time.monotonic())))
            response = self.sqs.receive_message(
                QueueUrl=queue_url, WaitTimeSeconds=wait, MaxNumberOfMessages=1
            )
            for message in response.get("Messages", []):
                self.sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
                body: dict[str, Any] = json.loads(message["Body"])
                return body
        return None

    def api_get(self, path: str, api_key: str | None = None) -> tuple[int, dict[str, Any]]:
        """GET `path` on the API with the stack's key (or the given one); return (status, JSON body)."""
        return self._api("GET", path, api_key)

    def api_post(self, path: str, api_key: str | None = None) -> tuple[int, dict[str, Any]]:
        """POST (no body) to `path`, e.g. `/jobs/<id>/cancel`; return (status, JSON body)."""
        return self._api("POST", path, api_key)

    def _api(self, method: str, path: str, api_key: str | None) -> tuple[int, dict[str, Any]]:
        key = self.endpoints["api_key"] if api_key is None else api_key
        request = urllib.request.Request(
            f"{self.endpoints['api_url']}{path}", headers={"x-api-key": key}, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    @staticmethod
    def download(url: str, target: Path) -> Path:
        """Fetch a presigned URL to a file."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response:
            target.write_bytes(response.read())
        return target
