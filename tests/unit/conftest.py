"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from moto import mock_aws

REGION = "us-east-1"


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches huggingface.co; tests of the Hub path serve one on loopback (and unset this)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process moto with test credentials; no `AWS_ENDPOINT_URL`, so boto3 goes to moto, not a server."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    # moto keeps this switch process-wide once a test turns it on: say it, so executions stay RUNNING.
    with mock_aws(config={"stepfunctions": {"execute_state_machine": False}}):
        yield
