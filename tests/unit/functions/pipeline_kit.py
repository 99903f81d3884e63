"""Helpers of the pipeline step tests: a job in a given state, a model.tar.gz like SageMaker's."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import boto3
from functions_aws import ARTIFACTS_BUCKET, REGION, FakeLambdaContext, claim_job, load_event
from loraflow_pipeline import app
from loraflow_pipeline.logic import PipelineTasks
from loraflow_shared.base_models import BaseModelSource
from loraflow_shared.families import ComputeClass
from loraflow_shared.jobs.model import Job, JobStatus, PreviewSettings
from loraflow_shared.jobs.repository import JobRepository

JOB_ID = load_event("sfn_record_training.json")["job_id"]
PATH_TO = {
    JobStatus.QUEUED: [JobStatus.QUEUED],
    JobStatus.TRAINING: [JobStatus.QUEUED, JobStatus.TRAINING],
    JobStatus.GENERATING_PREVIEWS: [JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS],
}


def run(tasks: PipelineTasks, context: FakeLambdaContext, payload: dict[str, Any]) -> Any:
    return app.lambda_handler(payload, context, tasks=tasks)


def step(action: str, attempt: int = 1, **fields: Any) -> dict[str, Any]:
    """A state machine payload for the test job's `attempt`."""
    return {"action": action, "job_id": JOB_ID, "attempt": attempt, **fields}


def record_payload(archive_uri: str) -> dict[str, Any]:
    """`record_training` as the state machine sends it: the `.sync` task's DescribeTrainingJob output."""
    payload = load_event("sfn_record_training.json")
    payload["training_job"]["ModelArtifacts"] = {"S3ModelArtifacts": archive_uri}
    return payload


def job_in(
    repository: JobRepository,
    status: JobStatus,
    compute: ComputeClass = "standard",
    base_model: str = "s3://loraflow-artifacts/base-models/tiny-sd/",
    source: BaseModelSource | None = None,
) -> Job:
    return claim_job(
        repository,
        JOB_ID,
        PATH_TO.get(status, []),
        dataset_s3_uri="s3://loraflow-datasets/0001-dataset/",
        config_file="config.toml",
        base_model=base_model,
        base_model_source=source,
        compute=compute,
        preview=PreviewSettings(
            prompts=["a photo of zqxj dog", "zqxj dog"], steps=3, resolution=64, seed=7, clip_skip=2
        ),
    )


def model_archive(members: dict[str, bytes]) -> str:
    """Upload a model.tar.gz like SageMaker's (members under `./`) and return its URI."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    key = f"training/loraflow-{JOB_ID}-1-1/output/model.tar.gz"
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=ARTIFACTS_BUCKET, Key=key, Body=buffer.getvalue()
    )
    return f"s3://{ARTIFACTS_BUCKET}/{key}"


def read(key: str) -> bytes:
    return boto3.client("s3", region_name=REGION).get_object(Bucket=ARTIFACTS_BUCKET, Key=key)["Body"].read()
