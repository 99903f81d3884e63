"""Job control on the embedded local cloud, driven as a user would: cancel a training job (its trainer
process really stops), retry it as a new attempt that completes, a newer upload superseding an
unfinished job, and a rejected dataset fixed by deleting its bad file."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loraflow_local.client import StackClient
from loraflow_local.sample_dataset import write_sample_dataset

pytestmark = pytest.mark.integration

NOTIFICATION_TIMEOUT_S = 300


class Session:
    """A running local cloud, a notification queue, and helpers that only use the user's interfaces."""

    def __init__(self, client: StackClient, queue_url: str, root: Path) -> None:
        self.client = client
        self.queue_url = queue_url
        self.root = root
        self._seen: list[dict[str, Any]] = []

    def upload(self, dataset_id: str, mutate: Callable[[Path], None] | None = None) -> Path:
        folder = write_sample_dataset(self.root / dataset_id, max_train_steps=30, preview_steps=4)
        if mutate is not None:
            mutate(folder)
        self.client.upload_dataset(folder, dataset_id)
        return folder

    def notification(self, dataset: str, status: str) -> dict[str, Any]:
        """The first notification of `dataset` with `status` (earlier ones of other datasets are kept)."""
        deadline = time.monotonic() + NOTIFICATION_TIMEOUT_S
        while time.monotonic() < deadline:
            for seen in self._seen:
                if (seen["dataset"], seen["status"]) == (dataset, status):
                    self._seen.remove(seen)
                    return seen
            received = self.client.next_notification(self.queue_url, timeout_s=5)
            if received is not None:
                self._seen.append(received)
        raise AssertionError(f"no {status} notification for {dataset}; seen {self._seen}")

    def wait_for_status(self, dataset: str, status: str, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code, listing = self.client.api_get(f"/jobs?dataset={dataset}")
            assert code == 200, listing
            for job in listing["items"]:
                if job["status"] == status:
                    return dict(job)
            time.sleep(0.3)
        raise AssertionError(f"no {status} job for {dataset}: {listing}")


def _trainer_processes(training_job_name: str) -> list[int]:
    """Local trainer processes of a training job (their working folder carries the job's name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"loraflow_training" in command and training_job_name in cwd:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    from loraflow_local.cloud import LocalCloud

    root = tmp_path_factory.mktemp("job-control")
    with LocalCloud(root / "state") as cloud:
        client = StackClient(cloud.endpoints)
        yield Session(client, client.subscribe_notifications("job-control"), root)


def _longer_training(folder: Path) -> None:
    config = folder / "kohya-sdxl-config.toml"
    config.write_text(config.read_text().replace("max_train_steps = 30", "max_train_steps = 60"))


def test_given_training_job_when_cancelled_then_trainer_stops_and_a_retry_completes_as_attempt_2(
    session: Session,
) -> None:
    dataset = "0101-cancel"
    session.upload(dataset, _longer_training)
    job = session.wait_for_status(dataset, "TRAINING")
    job_id = job["job_id"]
    time.sleep(1.0)  # the training job is submitted right after TRAINING is recorded

    code, cancelled = session.client.api_post(f"/jobs/{job_id}/cancel")

    assert (code, cancelled["status"]) == (200, "CANCELLED"), cancelled
    assert [e["code"] for e in cancelled["errors"]] == ["CANCELLED"]
    notice = session.notification(dataset, "CANCELLED")
    assert (notice["job_id"], notice["api_path"]) == (job_id, f"/jobs/{job_id}")
    [name] = cancelled["attempts"][0]["training_job_names"]
    sagemaker = session.client.client("sagemaker")
    deadline = time.monotonic() + 30  # on AWS: SIGTERM, then SIGKILL 120 s later at the latest
    while time.monotonic() < deadline and (
        _trainer_processes(name)
        or sagemaker.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] == "Stopping"
    ):
        time.sleep(0.5)
    assert _trainer_processes(name) == []
    assert sagemaker.describe_training_job(TrainingJobName=name)["TrainingJobStatus"] == "Stopped"
    assert session.client.api_post(f"/jobs/{job_id}/cancel")[0] == 409

    code, retried = session.client.api_post(f"/jobs/{job_id}/retry")

    assert (code, retried["status"], retried["attempt"]) == (202, "QUEUED", 2), retried
    completed = session.notification(dataset, "COMPLETED")
    assert (completed["job_id"], completed["attempt"]) == (job_id, 2)
    assert completed["artifacts"]["lora_diffusers_s3_uri"].endswith("pytorch_lora_weights.safetensors")
    code, final = session.client.api_get(f"/jobs/{job_id}")
    assert [a["status"] for a in final["attempts"]] == ["CANCELLED", "COMPLETED"]
    second_name = final["attempts"][1]["training_job_names"][0]
    assert second_name != name and second_name.endswith("-2-1")
    assert final["cost"]["billable_seconds"] > 0 and final["cost"]["instance_type"].startswith("ml.")
    assert session.client.api_post(f"/jobs/{job_id}/retry")[0] == 409


def test_given_unfinished_job_when_a_newer_version_is_uploaded_then_superseded_and_newer_completes(
    session: Session,
) -> None:
    dataset = "0102-supersede"
    folder = session.upload(dataset, _longer_training)
    older = session.wait_for_status(dataset, "TRAINING")

    extra = folder / "10_dwjz" / "img00.png"
    session.client.s3.upload_file(
        str(extra), session.client.endpoints["dataset_bucket"], f"{dataset}/10_dwjz/img99.png"
    )

    superseded = session.notification(dataset, "CANCELLED")
    completed = session.notification(dataset, "COMPLETED")
    assert superseded["job_id"] == older["job_id"] != completed["job_id"]
    [reason] = superseded["errors"]
    assert reason["code"] == "SUPERSEDED" and completed["job_id"] in reason["message"]


def test_given_rejected_dataset_when_its_bad_file_is_deleted_then_validated_again_and_completed(
    session: Session,
) -> None:
    dataset = "0103-fix-by-deleting"

    def add_broken_image(folder: Path) -> None:
        (folder / "10_dwjz" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)

    session.upload(dataset, add_broken_image)
    rejected = session.notification(dataset, "REJECTED")
    assert any(e["path"] == "10_dwjz/broken.png" for e in rejected["errors"]), rejected

    session.client.s3.delete_object(
        Bucket=session.client.endpoints["dataset_bucket"], Key=f"{dataset}/10_dwjz/broken.png"
    )

    completed = session.notification(dataset, "COMPLETED")
    assert completed["job_id"] != rejected["job_id"]
