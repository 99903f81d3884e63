"""A Hub base model in the pipeline: pinned at ingest, trained from the stack's mirror once it is published
(an input channel), mirrored by exactly one job at a time (the lease), and previewed from the mirror."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from functions_aws import ARTIFACTS_BUCKET, REGION, Cloud, FakeLambdaContext, claim_job
from loraflow_pipeline.logic import PipelineTasks
from loraflow_shared.base_model_mirror import MirrorStore
from loraflow_shared.base_models import BaseModelSource, lease_key, mirror_prefix
from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.jobs.model import JobStatus
from loraflow_shared.jobs.repository import JobRepository
from pipeline_kit import JOB_ID, PATH_TO, job_in, read, run, step

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COMMIT = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
SOURCE = BaseModelSource(repo=REPO, commit=COMMIT)
PINNED = f"{REPO}@{COMMIT}"
MIRROR_URI = f"s3://{ARTIFACTS_BUCKET}/{mirror_prefix(REPO, COMMIT)}"
OTHER_JOB = "0002-dataset-0123456789abcdef"


@pytest.fixture
def store(cloud: Cloud) -> MirrorStore:
    return MirrorStore(boto3.client("s3", region_name=REGION), ARTIFACTS_BUCKET)


@pytest.fixture
def model_folder(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1000)
    yield folder


def _hub_job(repository: JobRepository, status: JobStatus = JobStatus.QUEUED) -> None:
    job_in(repository, status, base_model=REPO, source=SOURCE)


def _channels(result: dict[str, Any]) -> dict[str, str]:
    return {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in result["channels"]}


def test_given_hub_model_not_mirrored_when_training_marked_then_pinned_commit_and_this_job_writes_the_mirror(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    _hub_job(repository)

    result = run(tasks, context, step("mark_training"))

    assert result["base_model"] == PINNED
    assert result["base_model_mirror"] == MIRROR_URI
    assert _channels(result) == {"dataset": "s3://loraflow-datasets/0001-dataset/"}
    # A retried step (the same job) keeps its lease.
    assert run(tasks, context, step("mark_training"))["base_model_mirror"] == MIRROR_URI


def test_given_another_job_writing_the_mirror_when_training_marked_then_hub_once_without_writing(
    tasks: PipelineTasks, repository: JobRepository, store: MirrorStore, context: FakeLambdaContext
) -> None:
    assert store.acquire_lease(REPO, COMMIT, OTHER_JOB, ttl_seconds=3600)
    _hub_job(repository)

    result = run(tasks, context, step("mark_training"))

    assert (result["base_model"], result["base_model_mirror"]) == (PINNED, "")
    assert set(_channels(result)) == {"dataset"}


def test_given_lease_of_a_writer_that_died_when_training_marked_then_this_job_takes_it_over(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    client = boto3.client("s3", region_name=REGION)
    long_ago = MirrorStore(client, ARTIFACTS_BUCKET, clock=lambda: datetime.now(UTC) - timedelta(days=1))
    assert long_ago.acquire_lease(REPO, COMMIT, OTHER_JOB, ttl_seconds=3600)  # expired 23 hours ago
    _hub_job(repository)

    result = run(tasks, context, step("mark_training"))

    assert result["base_model_mirror"] == MIRROR_URI
    lease = client.get_object(Bucket=ARTIFACTS_BUCKET, Key=lease_key(REPO, COMMIT))["Body"].read()
    assert JOB_ID.encode() in lease


def test_given_published_mirror_when_training_marked_then_base_model_channel_and_recorded_on_the_job(
    tasks: PipelineTasks,
    repository: JobRepository,
    store: MirrorStore,
    model_folder: Path,
    context: FakeLambdaContext,
) -> None:
    manifest = store.upload(model_folder, REPO, COMMIT, revision=None, holder=OTHER_JOB)
    _hub_job(repository)

    result = run(tasks, context, step("mark_training"))

    assert _channels(result) == {"dataset": "s3://loraflow-datasets/0001-dataset/", "base_model": MIRROR_URI}
    assert (result["base_model"], result["base_model_mirror"]) == (PINNED, "")
    source = repository.require(JOB_ID).base_model_source
    assert source is not None and source.mirror_s3_uri == MIRROR_URI
    assert manifest.files == {"model_index.json": 42, "unet/diffusion_pytorch_model.safetensors": 1000}


def test_given_partial_mirror_when_training_marked_then_not_used(
    tasks: PipelineTasks,
    repository: JobRepository,
    store: MirrorStore,
    model_folder: Path,
    context: FakeLambdaContext,
) -> None:
    store.upload(model_folder, REPO, COMMIT, revision=None, holder=OTHER_JOB)
    weights = mirror_prefix(REPO, COMMIT) + "unet/diffusion_pytorch_model.safetensors"
    boto3.client("s3", region_name=REGION).delete_object(Bucket=ARTIFACTS_BUCKET, Key=weights)
    _hub_job(repository)

    result = run(tasks, context, step("mark_training"))

    assert set(_channels(result)) == {"dataset"}
    assert result["base_model_mirror"] == MIRROR_URI  # published again, by this job


@pytest.mark.parametrize("published", [True, False])
def test_given_hub_model_when_previews_requested_then_endpoint_loads_the_mirror_once_published(
    tasks: PipelineTasks,
    repository: JobRepository,
    store: MirrorStore,
    model_folder: Path,
    context: FakeLambdaContext,
    published: bool,
) -> None:
    if published:
        store.upload(model_folder, REPO, COMMIT, revision=None, holder=JOB_ID)
    _hub_job(repository, JobStatus.TRAINING)
    lora_uri = f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}/lora/pytorch_lora_weights.safetensors"

    run(tasks, context, step("request_previews", task_token="token-1", lora_s3_uri=lora_uri))

    request = PreviewRequest.model_validate_json(read(f"async-inference/requests/{JOB_ID}-1.json"))
    assert request.base_model == (MIRROR_URI if published else PINNED)
    source = repository.require(JOB_ID).base_model_source
    assert source is not None and source.mirror_s3_uri == (MIRROR_URI if published else None)


def test_given_two_jobs_on_one_new_commit_when_both_marked_then_exactly_one_writes_the_mirror(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    _hub_job(repository)
    claim_job(
        repository,
        OTHER_JOB,
        PATH_TO[JobStatus.QUEUED],
        dataset_s3_uri="s3://loraflow-datasets/0002-dataset/",
        config_file="config.toml",
        base_model=REPO,
        base_model_source=SOURCE,
    )

    first = run(tasks, context, step("mark_training"))
    second = run(tasks, context, {**step("mark_training"), "job_id": OTHER_JOB})

    assert [first["base_model_mirror"], second["base_model_mirror"]] == [MIRROR_URI, ""]
