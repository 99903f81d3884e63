"""A local cloud stopped while a job trains and started again with the same state folder: the job
resumes from its last checkpoint (as after a spot interruption) and completes; nothing is lost."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from loraflow_local.client import StackClient
from loraflow_local.sample_dataset import CONFIG_NAME, SAMPLE_DATASET_ID, write_sample_dataset

pytestmark = pytest.mark.integration


def _wait_for(client: StackClient, job_id: str, done: Any, timeout_s: float = 420) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code, job = client.api_get(f"/jobs/{job_id}")
        if code == 200 and done(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never got there: {job}")


def _first_job(client: StackClient, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        items = client.api_get(f"/jobs?dataset={SAMPLE_DATASET_ID}")[1].get("items", [])
        if items:
            return str(items[0]["job_id"])
        time.sleep(0.3)
    raise AssertionError("no job was created")


def test_given_job_training_when_cloud_restarts_then_it_resumes_from_its_checkpoint_and_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraflow_local.cloud import LocalCloud

    monkeypatch.setenv("LORAFLOW_PROGRESS_INTERVAL_S", "1")  # the trainer reports often: we wait for it
    dataset = write_sample_dataset(tmp_path / "src", max_train_steps=150, preview_steps=4)
    config = dataset / CONFIG_NAME
    text = config.read_text().replace(
        "max_train_steps = 150", "max_train_steps = 150\nsave_every_n_steps = 10"
    )
    config.write_text(text)
    state = tmp_path / "state"

    with LocalCloud(state) as cloud:
        client = StackClient(cloud.endpoints)
        keys = client.upload_dataset(dataset, SAMPLE_DATASET_ID)
        job_id = _first_job(client)
        before = _wait_for(client, job_id, lambda job: (job.get("progress") or {}).get("step", 0) >= 20)
        api_key = cloud.endpoints["api_key"]
    assert before["status"] == "TRAINING"
    assert not (state / "endpoints.json").exists()

    with LocalCloud(state) as cloud:
        client = StackClient(cloud.endpoints)
        assert cloud.endpoints["api_key"] == api_key  # scripts keep working
        completed = _wait_for(client, job_id, lambda job: job["status"] not in {"QUEUED", "TRAINING"})
        report_path = client.download(completed["artifacts"]["training_report_url"], tmp_path / "report.json")
        listed = client.s3.list_objects_v2(Bucket=cloud.endpoints["dataset_bucket"], Prefix=SAMPLE_DATASET_ID)

    assert completed["status"] in {"GENERATING_PREVIEWS", "COMPLETED"}, completed
    assert completed["attempt"] == 1  # the same attempt, as after a spot interruption
    report = json.loads(report_path.read_text())
    assert report["steps"] == 150
    assert report["resumed_from_step"] >= 10, report
    assert sorted(item["Key"] for item in listed["Contents"]) == sorted(keys)
