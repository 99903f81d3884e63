"""The trainer and the stack's base-model mirror, against a Hub served on loopback and moto's S3 server:
the first job downloads the pinned commit once and publishes the mirror; a job given the mirror as its
`base_model` channel (what SageMaker makes of the S3 prefix) fetches 0 bytes from the Hub and trains the
same LoRA; a job that does not hold the lease never writes the mirror."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from diffusion_kit import SageMakerDirs, make_sagemaker_dirs
from loraflow_diffusion.tiny_models import TINY_MODELS
from loraflow_local.loopback_hub import LoopbackHub
from loraflow_local.moto_server import moto_server
from loraflow_shared.base_model_mirror import MirrorStore
from loraflow_shared.base_models import BASE_MODEL_CHANNEL, mirror_prefix, pinned
from loraflow_training.report import TrainingReportV2
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # trains a tiny model three times, in subprocesses

REPO = "loopback/tiny-sd"
BUCKET = "loraflow-artifacts"
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackHub]:
    _, build = TINY_MODELS["tiny-sd"]
    with LoopbackHub({REPO: build(tmp_path_factory.mktemp("hub") / "tiny-sd")}) as served:
        yield served


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def s3(moto_url: str) -> Iterator[object]:
    client = boto3.client(
        "s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    client.create_bucket(Bucket=BUCKET)
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def _train(
    dirs: SageMakerDirs, hub: LoopbackHub, moto_url: str, cache: Path, mirror: str = "", succeeds: bool = True
) -> None:
    hyperparameters = dirs.root / "input" / "config" / "hyperparameters.json"
    values = json.loads(hyperparameters.read_text())
    hyperparameters.write_text(json.dumps({**values, "base_model_mirror": mirror}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AWS_"))}
    env |= dirs.env() | {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(cache / "hf"),
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "loraflow_training", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert (result.returncode == 0) == succeeds, result.stderr[-3000:]


def _download_channel(s3: object, prefix: str, channel: Path) -> None:
    """What SageMaker does with an S3Prefix channel in File mode: every object under it, as files."""
    client: object = s3
    for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]:  # type: ignore[attr-defined]
        target = channel / item["Key"][len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, item["Key"], str(target))  # type: ignore[attr-defined]


def test_given_lease_holder_when_trained_then_mirror_published_and_next_job_fetches_no_hub_bytes(
    tmp_path: Path, hub: LoopbackHub, moto_url: str, s3: object
) -> None:
    commit = hub.commit(REPO)
    store = MirrorStore(s3, BUCKET)  # type: ignore[arg-type]
    uri = store.uri(REPO, commit)
    assert store.acquire_lease(REPO, commit, "job-1", ttl_seconds=600)  # as mark_training does
    first = make_sagemaker_dirs(tmp_path / "first", pinned(REPO, commit))
    hub.reset_counters()

    _train(first, hub, moto_url, tmp_path / "cache-first", mirror=uri)

    assert hub.bytes_served > 0
    manifest = store.published(REPO, commit)
    assert manifest is not None and manifest.mirrored_by == "job-1"
    assert "model_index.json" in manifest.files and any(p.startswith("unet/") for p in manifest.files)
    assert store.acquire_lease(REPO, commit, "job-3", ttl_seconds=1)  # the writer released its lease

    # The second job: another machine (an empty cache), the mirror as its channel.
    second = make_sagemaker_dirs(tmp_path / "second", pinned(REPO, commit))
    _download_channel(s3, mirror_prefix(REPO, commit), second.root / "input" / "data" / BASE_MODEL_CHANNEL)
    hub.reset_counters()

    _train(second, hub, moto_url, tmp_path / "cache-second")

    assert (hub.bytes_served, hub.file_requests) == (0, 0)
    report = TrainingReportV2.model_validate_json((second.model / "training_report.json").read_text())
    assert report.base_model == pinned(REPO, commit)
    mine, theirs = load_file(second.model / LORA_FILE), load_file(first.model / LORA_FILE)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def test_given_job_without_the_lease_when_trained_then_hub_once_and_no_mirror_written(
    tmp_path: Path, hub: LoopbackHub, moto_url: str, s3: object
) -> None:
    commit = hub.commit(REPO)
    dirs = make_sagemaker_dirs(tmp_path / "job", pinned(REPO, commit))
    hub.reset_counters()

    _train(dirs, hub, moto_url, tmp_path / "cache")

    assert hub.bytes_served > 0
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0  # type: ignore[attr-defined]


def test_given_lease_holder_whose_download_fails_when_trained_then_model_load_failed_and_lease_released(
    tmp_path: Path, hub: LoopbackHub, moto_url: str, s3: object
) -> None:
    missing = "0" * 40  # a commit the Hub does not have (deleted since ingest pinned it)
    store = MirrorStore(s3, BUCKET)  # type: ignore[arg-type]
    assert store.acquire_lease(REPO, missing, "job-1", ttl_seconds=600)
    dirs = make_sagemaker_dirs(tmp_path / "job", pinned(REPO, missing))

    _train(dirs, hub, moto_url, tmp_path / "cache", mirror=store.uri(REPO, missing), succeeds=False)

    assert dirs.failure["code"] == "MODEL_LOAD_FAILED" and REPO in dirs.failure["message"]
    assert store.acquire_lease(REPO, missing, "job-2", ttl_seconds=600)  # free for the next job at once
    assert store.published(REPO, missing) is None
