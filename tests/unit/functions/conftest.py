from __future__ import annotations

from collections.abc import Iterator

import pytest
from functions_aws import REGION, Cloud, FakeLambdaContext, create_cloud
from loraflow_pipeline.adapters import build_tasks
from loraflow_pipeline.logic import PipelineTasks
from loraflow_pipeline.settings import PipelineSettings
from loraflow_shared.jobs.repository import JobRepository
from moto import mock_aws


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "POWERTOOLS_SERVICE_NAME": "loraflow-tests",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


@pytest.fixture
def cloud(aws_env: None) -> Iterator[Cloud]:
    # moto keeps this switch process-wide once a test turns it on: say it, so executions stay RUNNING.
    with mock_aws(config={"stepfunctions": {"execute_state_machine": False}}):
        yield create_cloud()


@pytest.fixture
def context() -> FakeLambdaContext:
    return FakeLambdaContext()


@pytest.fixture
def tasks(cloud: Cloud) -> PipelineTasks:
    """The pipeline function's steps with its own adapters (CAPACITY_WAIT_SECONDS=3600)."""
    return build_tasks(PipelineSettings.from_environ(cloud.env()))


@pytest.fixture
def repository(cloud: Cloud) -> JobRepository:
    return JobRepository(cloud.table)
