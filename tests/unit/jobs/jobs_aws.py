"""moto helpers for the job tests: the jobs table exactly as template.yaml declares it."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import boto3
from cfnlint.decode import decode

TEMPLATE_PATH = Path(__file__).resolve().parents[3] / "template.yaml"
REGION = "us-east-1"


@cache
def jobs_table_properties() -> dict[str, Any]:
    """JobsTable's key schema and indexes from the template, so tests cannot drift from the deployment."""
    template, errors = decode(str(TEMPLATE_PATH))
    assert template is not None, errors
    properties = template["Resources"]["JobsTable"]["Properties"]
    keys = ("AttributeDefinitions", "KeySchema", "GlobalSecondaryIndexes", "BillingMode")
    return {key: properties[key] for key in keys}


def create_jobs_table(name: str = "jobs") -> Any:
    dynamodb = boto3.resource("dynamodb", region_name=REGION)
    table = dynamodb.create_table(TableName=name, **jobs_table_properties())
    table.wait_until_exists()
    return table


def new_job(
    job_id: str = "a" * 24, dataset: str = "0001-dataset", created_at: str = "2025-01-15T10:00:00.000Z"
):
    """A freshly claimed job, as ingest creates it."""
    from loraflow_shared.jobs.model import Job, JobStatus

    return Job(
        job_id=job_id,
        dataset=dataset,
        status=JobStatus.VALIDATING,
        created_at=created_at,
        updated_at=created_at,
        fingerprint="f" * 64,
        dataset_s3_uri=f"s3://datasets/{dataset}/",
    )
