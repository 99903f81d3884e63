from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from jobs_aws import REGION, create_jobs_table
from loraflow_shared.jobs.repository import JobRepository
from moto import mock_aws


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield


@pytest.fixture
def jobs_table(aws: None) -> Any:
    return create_jobs_table()


@pytest.fixture
def repository(jobs_table: Any) -> JobRepository:
    return JobRepository(jobs_table)
