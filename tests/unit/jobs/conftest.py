from __future__ import annotations

from typing import Any

import pytest
from jobs_aws import create_jobs_table
from loraflow_shared.jobs.repository import JobRepository


@pytest.fixture
def jobs_table(aws: None) -> Any:
    return create_jobs_table()


@pytest.fixture
def repository(jobs_table: Any) -> JobRepository:
    return JobRepository(jobs_table)
