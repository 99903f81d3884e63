"""Which loraflow a client command talks to: a local cloud (`--local [STATE_DIR]`, its endpoints.json) or a
deployed stack (`--stack NAME [--region R]`, its CloudFormation outputs and API key, read with the user's
own AWS credentials). Without either, the default target: `LORAFLOW_TARGET` ("local:DIR" or
"stack:NAME[@REGION]"), else the one `loraflow use` saved in the user's config file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

DEFAULT_STATE_DIR = ".localcloud"  # `make local-up`'s
TARGET_VARIABLE = "LORAFLOW_TARGET"
LOCAL_KEY = "testing"  # the local cloud takes any credentials


class TargetError(Exception):
    """Said to the user as one line."""


@dataclass(frozen=True)
class Target:
    kind: str  # "local" or "stack"
    name: str  # the state dir or the stack name
    region: str | None = None

    @property
    def spec(self) -> str:
        """How `LORAFLOW_TARGET` and the config file write it."""
        return f"{self.kind}:{self.name}" + (f"@{self.region}" if self.region else "")


@dataclass(frozen=True)
class Endpoints:
    """What a client needs of a running loraflow."""

    target: Target
    api_url: str
    api_key: str
    dataset_bucket: str
    session: Any  # boto3 Session with the target's credentials and region
    aws_endpoint_url: str | None = None  # the local cloud's; None on AWS

    def client(self, service: str) -> Any:
        return self.session.client(service, endpoint_url=self.aws_endpoint_url)


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "loraflow" / "target"


def parse_target(spec: str) -> Target:
    kind, _, rest = spec.strip().partition(":")
    if kind == "local" and rest:
        return Target("local", rest)
    if kind == "stack" and rest:
        name, _, region = rest.partition("@")
        return Target("stack", name, region or None)
    raise TargetError(f"target {spec!r} is neither local:STATE_DIR nor stack:NAME[@REGION]")


def choose_target(local: str | None, stack: str | None, region: str | None) -> Target:
    """The command line's target, else `LORAFLOW_TARGET`, else the saved one, else the default local dir."""
    if local is not None:
        return Target("local", local or DEFAULT_STATE_DIR)
    if stack is not None:
        return Target("stack", stack, region)
    if os.environ.get(TARGET_VARIABLE):
        return parse_target(os.environ[TARGET_VARIABLE])
    saved = config_file()
    if saved.is_file():
        return parse_target(saved.read_text(encoding="utf-8"))
    return Target("local", DEFAULT_STATE_DIR)


def save_target(target: Target) -> Path:
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(target.spec + "\n", encoding="utf-8")
    return path


def resolve(target: Target) -> Endpoints:
    return _local(target) if target.kind == "local" else _stack(target)


def _local(target: Target) -> Endpoints:
    location = Path(target.name) / "endpoints.json"
    if not location.is_file():
        raise TargetError(
            f"no local cloud runs in {target.name} ({location} is missing): start one with "
            f"`loraflow local up --state-dir {target.name}`"
        )
    endpoints = json.loads(location.read_text(encoding="utf-8"))
    session = boto3.session.Session(
        aws_access_key_id=LOCAL_KEY, aws_secret_access_key=LOCAL_KEY, region_name=endpoints["region"]
    )
    return Endpoints(
        target,
        endpoints["api_url"],
        endpoints["api_key"],
        endpoints["dataset_bucket"],
        session,
        endpoints["aws_endpoint_url"],
    )


# The stack's outputs a client reads (template.yaml `Outputs`; a template test keeps the two in step).
API_URL_OUTPUT, API_KEY_OUTPUT, DATASET_BUCKET_OUTPUT = "ApiUrl", "ApiKeyId", "DatasetBucketName"


def _stack(target: Target) -> Endpoints:
    session = boto3.session.Session(region_name=target.region)
    stacks = session.client("cloudformation").describe_stacks(StackName=target.name)["Stacks"]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}
    missing = {API_URL_OUTPUT, API_KEY_OUTPUT, DATASET_BUCKET_OUTPUT} - outputs.keys()
    if missing:
        raise TargetError(f"stack {target.name} lacks the outputs {sorted(missing)}: not a loraflow stack")
    key = session.client("apigateway").get_api_key(apiKey=outputs[API_KEY_OUTPUT], includeValue=True)
    api_url, bucket = outputs[API_URL_OUTPUT].rstrip("/"), outputs[DATASET_BUCKET_OUTPUT]
    return Endpoints(target, api_url, key["value"], bucket, session)
