"""Local training jobs honour CheckpointConfig as SageMaker does: restore before, mirror during and after."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loraflow_local.services import LocalServices

Client = Callable[[str], Any]


@pytest.fixture
def buckets(client: Client) -> Any:
    s3 = client("s3")
    for bucket in ("datasets", "artifacts"):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket="datasets", Key="0001/10_dwjz/a.png", Body=b"png")
    return s3


def _create_job(client: Client, name: str, checkpoint: dict[str, str] | None, **hyperparameters: str) -> None:
    request: dict[str, Any] = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": "x", "TrainingInputMode": "File"},
        "RoleArn": "arn:aws:iam::123456789012:role/sm",
        "HyperParameters": {"mode": "checkpoint", **hyperparameters},
        "InputDataConfig": [
            {
                "ChannelName": "dataset",
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://datasets/0001/"}},
            }
        ],
        "OutputDataConfig": {"S3OutputPath": "s3://artifacts/training"},
        "ResourceConfig": {"InstanceType": "ml.g5.12xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
        "EnableManagedSpotTraining": True,
        "StoppingCondition": {"MaxRuntimeInSeconds": 60, "MaxWaitTimeInSeconds": 120},
    }
    if checkpoint is not None:
        request["CheckpointConfig"] = checkpoint
    client("sagemaker").create_training_job(**request)


def _release(services: LocalServices, name: str) -> None:
    """Let the fake trainer past its first save (it waits for this file in its working directory)."""
    workdir = services.state_dir / "sagemaker" / "training" / name
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "release").touch()


def _describe(client: Client, name: str) -> dict[str, Any]:
    job: dict[str, Any] = client("sagemaker").describe_training_job(TrainingJobName=name)
    return job


def _finished(client: Client, name: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        job = _describe(client, name)
        return job if job["TrainingJobStatus"] != "InProgress" else None

    return check


def _objects(s3: Any, prefix: str) -> dict[str, bytes]:
    listed = s3.list_objects_v2(Bucket="artifacts", Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: s3.get_object(Bucket="artifacts", Key=o["Key"])["Body"].read()
        for o in listed
    }


def _output_file(s3: Any, name: str, member: str) -> Any:
    body = s3.get_object(Bucket="artifacts", Key=f"training/{name}/output/output.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        extracted = tar.extractfile(member)
        assert extracted is not None
        return json.loads(extracted.read())


def test_given_checkpoints_in_s3_when_job_starts_then_trainer_finds_them_in_its_checkpoint_dir(
    services: LocalServices, client: Client, buckets: Any, wait_for: Callable[..., Any]
) -> None:
    buckets.put_object(Bucket="artifacts", Key="checkpoints/job-r/state/step-1/lora.pt", Body=b"before")
    # A sibling prefix sharing the name's start is another job's folder, not this one's.
    buckets.put_object(Bucket="artifacts", Key="checkpoints/job-r0/state/step-9/lora.pt", Body=b"other")
    _release(services, "job-r")

    _create_job(client, "job-r", {"S3Uri": "s3://artifacts/checkpoints/job-r"})
    job = wait_for(_finished(client, "job-r"))

    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    assert _output_file(buckets, "job-r", "found_checkpoints.json") == {"state/step-1/lora.pt": "before"}


def test_given_running_job_when_it_saves_then_s3_has_its_progress_before_it_ends_and_mirrors_deletions(
    services: LocalServices, client: Client, buckets: Any, wait_for: Callable[..., Any]
) -> None:
    prefix = "checkpoints/job-p/"
    _create_job(client, "job-p", {"S3Uri": f"s3://artifacts/{prefix}", "LocalPath": "/opt/ml/checkpoints/"})

    first = wait_for(lambda: _objects(buckets, prefix).get("progress.json"))
    still_running = _describe(client, "job-p")["TrainingJobStatus"]
    _release(services, "job-p")
    job = wait_for(_finished(client, "job-p"))

    assert json.loads(first) == {"step": 1, "total_steps": 2}
    assert still_running == "InProgress"
    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    # step-1 was deleted locally after step-2 was saved: S3 follows, as SageMaker's sync does.
    assert _objects(buckets, prefix) == {
        "progress.json": b'{"step": 2, "total_steps": 2}',
        "state/step-2/lora.pt": b"weights at step 2",
    }


def test_given_job_crashing_after_a_save_when_it_ends_then_that_save_is_in_s3_for_the_next_run(
    services: LocalServices, client: Client, buckets: Any, wait_for: Callable[..., Any]
) -> None:
    _release(services, "job-c")

    _create_job(client, "job-c", {"S3Uri": "s3://artifacts/checkpoints/job-c/"}, checkpoint_then="crash")
    job = wait_for(_finished(client, "job-c"))

    assert job["TrainingJobStatus"] == "Failed"
    assert set(_objects(buckets, "checkpoints/job-c/")) == {"progress.json", "state/step-2/lora.pt"}


def test_given_job_without_checkpoint_config_when_it_saves_then_nothing_reaches_s3(
    services: LocalServices, client: Client, buckets: Any, wait_for: Callable[..., Any]
) -> None:
    _release(services, "job-n")

    _create_job(client, "job-n", None)
    job = wait_for(_finished(client, "job-n"))

    assert job["TrainingJobStatus"] == "Completed", job.get("FailureReason")
    assert (
        services.state_dir / "sagemaker" / "training" / "job-n" / "checkpoints" / "progress.json"
    ).is_file()
    assert _objects(buckets, "checkpoints/") == {}


def test_given_checkpoint_local_path_elsewhere_when_job_runs_then_failed_naming_local_path(
    services: LocalServices, client: Client, buckets: Any, wait_for: Callable[..., Any], tmp_path: Path
) -> None:
    checkpoint = {"S3Uri": "s3://artifacts/checkpoints/job-l/", "LocalPath": str(tmp_path / "elsewhere")}

    _create_job(client, "job-l", checkpoint)
    job = wait_for(_finished(client, "job-l"))

    assert job["TrainingJobStatus"] == "Failed"
    assert "LocalPath" in job["FailureReason"]
    assert not (tmp_path / "elsewhere").exists()
