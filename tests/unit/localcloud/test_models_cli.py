"""`loraflow models`: pull a Hub model (served on loopback) into a stack (moto's server, as a local cloud's
endpoints.json names it), list it with the jobs pinned to it, and delete it only once none is unfinished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from loraflow_diffusion.tiny_models import TINY_MODELS
from loraflow_local.cli import main
from loraflow_local.loopback_hub import LoopbackHub
from loraflow_local.moto_server import moto_server
from loraflow_shared.base_models import BaseModelSource, mirror_prefix
from loraflow_shared.jobs.model import Job, JobStatus
from loraflow_shared.jobs.repository import JobRepository

pytestmark = pytest.mark.slow  # pulls a tiny pipeline through a child process

REPO = "loopback/tiny-sd"
REGION = "us-east-1"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackHub]:
    _, build = TINY_MODELS["tiny-sd"]
    with LoopbackHub({REPO: build(tmp_path_factory.mktemp("hub") / "tiny-sd")}) as served:
        yield served


@dataclass(frozen=True)
class Stack:
    state_dir: Path
    s3: Any
    bucket: str
    repository: JobRepository

    def copied_objects(self, commit: str) -> int:
        return int(
            self.s3.list_objects_v2(Bucket=self.bucket, Prefix=mirror_prefix(REPO, commit))["KeyCount"]
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """A state dir whose endpoints.json names a bucket and a jobs table in moto's server (moto's state is
    per process: the names are the test's own)."""
    bucket, table_name = f"artifacts-{tmp_path.name}".lower()[:60], f"jobs-{tmp_path.name}"
    with moto_server() as url:
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        s3 = session.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket=bucket)
        dynamodb = session.resource("dynamodb", endpoint_url=url)
        table = dynamodb.create_table(
            TableName=table_name,
            KeySchema=[{"AttributeName": "job_id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "job_id", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        endpoints = {
            "aws_endpoint_url": url,
            "region": REGION,
            "artifacts_bucket": bucket,
            "jobs_table": table_name,
        }
        (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
        yield Stack(tmp_path, s3, bucket, JobRepository(table))


def _pull(state_dir: Path, hub: LoopbackHub, model: str) -> subprocess.CompletedProcess[str]:
    """As a user runs it: a new process (huggingface_hub reads HF_ENDPOINT when it is imported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_"))}
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(state_dir / "hf")}
    return subprocess.run(
        [sys.executable, "-m", "loraflow_local.cli", "models", "--state-dir", str(state_dir), "pull", model],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _pinned_job(repository: JobRepository, commit: str) -> str:
    now = repository.now()
    job = Job(
        job_id="0001-dataset-0123456789abcdef",
        dataset="0001-dataset",
        status=JobStatus.VALIDATING,
        created_at=now,
        updated_at=now,
        fingerprint="f" * 64,
        dataset_s3_uri="s3://datasets/0001-dataset/",
        base_model=REPO,
        base_model_source=BaseModelSource(repo=REPO, commit=commit),
    )
    repository.claim(job)
    return job.job_id


def test_given_hub_model_when_pulled_listed_and_deleted_then_cached_once_and_kept_while_a_job_uses_it(
    stack: Stack, hub: LoopbackHub, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir, repository = stack.state_dir, stack.repository
    commit = hub.commit(REPO)
    hub.reset_counters()

    pulled = _pull(state_dir, hub, REPO)

    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert f"cached {REPO}@{commit}" in pulled.stdout
    assert hub.bytes_served > 0
    hub.reset_counters()
    again = _pull(state_dir, hub, f"{REPO}@main")
    assert (again.returncode, hub.bytes_served) == (0, 0)
    assert "cached already" in again.stdout

    job_id = _pinned_job(repository, commit)
    assert main(["models", "--state-dir", str(state_dir), "list"]) == 0
    listed = capsys.readouterr().out
    assert f"{REPO}@{commit}" in listed and job_id in listed

    assert main(["models", "--state-dir", str(state_dir), "delete", REPO]) == 1
    assert job_id in capsys.readouterr().err
    assert stack.copied_objects(commit) > 0

    repository.transition(job_id, JobStatus.REJECTED)
    assert main(["models", "--state-dir", str(state_dir), "delete", f"{REPO}@{commit}"]) == 0
    assert stack.copied_objects(commit) == 0
    assert main(["models", "--state-dir", str(state_dir), "list"]) == 0
    assert "no cached base models" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["pull", "s3://bucket/model/"], "is not a Hub model id"),
        (["pull", "nobody/no-such-model"], "there is no Hub model 'nobody/no-such-model'"),
        (["delete", REPO], "is not cached"),
    ],
)
def test_given_bad_request_when_models_run_then_one_line_error_and_exit_1(
    stack: Stack,
    hub: LoopbackHub,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    expected: str,
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)

    assert main(["models", "--state-dir", str(stack.state_dir), *arguments]) == 1

    error = capsys.readouterr().err
    assert error.startswith("loraflow models: ") and expected in error and "Traceback" not in error


def test_given_state_dir_without_a_cloud_when_models_listed_then_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--state-dir", str(tmp_path), "list"]) == 1
    assert "no local cloud runs in" in capsys.readouterr().err
