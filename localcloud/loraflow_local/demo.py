"""`loraflow demo`: the whole pipeline on a generated sample dataset, end to end, on the local cloud."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from loraflow_local.client import TERMINAL_STATUSES, StackClient
from loraflow_local.job_files import CONTACT_SHEET_NAME, save_job_files
from loraflow_local.sample_dataset import SAMPLE_DATASET_ID, write_sample_dataset

JOB_TIMEOUT_S = 600.0


def run_demo(output: Path, state_dir: Path | None = None) -> int:
    """Run the demo; copy the LoRA, previews and job JSON into `output`. Exit code 0 only on COMPLETED."""
    from loraflow_local.cloud import LocalCloud  # imported late: starting the cloud is the slow part

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="loraflow-demo-"))
    try:
        # Fresh: a state folder kept from an earlier demo would hold the sample dataset's job already.
        with LocalCloud(state_dir or work / "state", fresh=True) as cloud:
            up_seconds = time.monotonic() - started
            print(f"local cloud up in {up_seconds:.1f}s: {cloud.endpoints['aws_endpoint_url']}")
            client = StackClient(cloud.endpoints)
            queue_url = client.subscribe_notifications("loraflow-demo-notifications")
            dataset = write_sample_dataset(work / "data")
            keys = client.upload_dataset(dataset, SAMPLE_DATASET_ID)
            print(
                f"uploaded {len(keys)} files to s3://{cloud.endpoints['dataset_bucket']}/{SAMPLE_DATASET_ID}/"
            )
            notification = _wait_for_terminal(client, queue_url)
            if notification is None:
                print(f"no terminal notification within {JOB_TIMEOUT_S:.0f}s")
                return 1
            status, job = client.api_get(f"/jobs/{notification['job_id']}")
            if status != 200:
                print(f"GET /jobs/{notification['job_id']} answered {status}: {job}")
                return 1
            save_job_files(job, output)
            _print_summary(job, output, time.monotonic() - started)
            return 0 if job["status"] == "COMPLETED" else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait_for_terminal(client: StackClient, queue_url: str) -> dict[str, Any] | None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (remaining := deadline - time.monotonic()) > 0:
        notification = client.next_notification(queue_url, remaining)
        if notification is None:
            return None
        print(f"notification: job {notification['job_id']} is {notification['status']}")
        if notification["status"] in TERMINAL_STATUSES:
            return notification
    return None


def _print_summary(job: dict[str, Any], output: Path, seconds: float) -> None:
    training = job.get("training") or {}
    print(f"job {job['job_id']} for dataset {job['dataset']}: {job['status']} in {seconds:.1f}s")
    if training:
        print(
            f"  training: {training.get('steps')} steps, final loss {training.get('final_loss')}, "
            f"{training.get('seconds')}s"
        )
    for problem in job.get("errors") or []:
        print(f"  error {problem['code']} {problem['path']}: {problem['message']}")
    for problem in job.get("warnings") or []:
        print(f"  warning {problem['code']} {problem['path']}: {problem['message']}")
    print(f"  previews: {len(job.get('previews') or [])}; outputs in {output}/")
    if job.get("contact_sheet_url"):
        sheet = output / CONTACT_SHEET_NAME
        print(f"  contact sheet (base model | with the LoRA, a row per prompt): {sheet}")
