"""What provisioning handlers share: the template, the resolver, boto3 clients, and what they record."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from loraflow_local.intrinsics import Resolver
from loraflow_local.services import LocalServices
from loraflow_local.template import StackTemplate


@dataclass(frozen=True)
class SqsMapping:
    """An SQS event source mapping, run by `sqs_poller` rather than by moto."""

    function_name: str
    queue_arn: str
    queue_url: str
    batch_size: int
    report_batch_item_failures: bool


@dataclass
class RestApiRecord:
    """A REST API for the local router: its swagger and the API keys that open it."""

    api_id: str
    name: str
    body: dict[str, Any]
    stage: str | None = None
    key_ids: set[str] = field(default_factory=set)


@dataclass
class ProvisionContext:
    stack: StackTemplate
    resolver: Resolver
    services: LocalServices
    stack_name: str
    region: str
    account: str
    queue_urls: dict[str, str] = field(default_factory=dict)  # queue ARN → URL
    layers: dict[str, Path] = field(default_factory=dict)  # layer version ARN → local folder
    sqs_mappings: list[SqsMapping] = field(default_factory=list)
    rest_apis: dict[str, RestApiRecord] = field(default_factory=dict)  # by API id
    api_keys: dict[str, str] = field(default_factory=dict)  # key id → value
    # ApiKey logical id → value; preset with a restarted cloud's saved values, so clients keep working.
    api_key_values: dict[str, str] = field(default_factory=dict)
    usage_plans: dict[str, set[str]] = field(default_factory=dict)  # plan id → API ids
    skipped: dict[str, str] = field(default_factory=dict)  # logical id → type

    _clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        # No endpoint_url: boto3 reads AWS_ENDPOINT_URL, exactly as the deployed code does.
        if service not in self._clients:
            self._clients[service] = boto3.client(service, region_name=self.region)  # type: ignore[call-overload]
        return self._clients[service]

    def physical_name(self, logical_id: str, limit: int = 64, lower: bool = False) -> str:
        """A deterministic name like CloudFormation's `<stack>-<LogicalId>` (without the random suffix)."""
        name = f"{self.stack_name}-{logical_id}"
        name = re.sub(r"[^A-Za-z0-9-]", "-", name)[:limit].rstrip("-")
        return name.lower() if lower else name

    def arn(self, service: str, resource: str, region: bool = True) -> str:
        return f"arn:aws:{service}:{self.region if region else ''}:{self.account}:{resource}"


def bucket_name(stack_name: str, logical_id: str) -> str:
    """A bucket's local name when the template sets none (known up front: the base model goes there)."""
    return re.sub(r"[^a-z0-9-]", "-", f"{stack_name}-{logical_id}".lower())[:63].rstrip("-")
