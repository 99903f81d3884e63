"""The stack's copy of a Hub base model against the Hub itself: a Hub served on loopback, moto's S3 server
and the trainer under SageMaker's contract (`python -m loraflow_training train`), on the tiny FLUX.1.

- hub_bytes_second_job: what the Hub serves to a job given the stack's copy as its `base_model` channel,
  after a first job pinned the commit, downloaded it and published the copy (target 0).
- time_to_first_step_cached_vs_hub: from a job's start to its first optimizer step, with the copy (its
  channel downloaded from S3 first, as SageMaker does before the container starts) over with the download
  from the Hub (without writing a copy). The tiny model is a few MB, so the imports dominate both: the
  README gives the arithmetic for real SDXL and FLUX.1 downloads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from loraflow_diffusion.tiny_models import TINY_MODELS
from loraflow_local.loopback_hub import LoopbackHub
from loraflow_local.moto_server import moto_server
from loraflow_shared.base_model_mirror import MirrorStore
from loraflow_shared.base_models import BASE_MODEL_CHANNEL, mirror_prefix, pinned

from bench.training import CONFIG_FILE, sagemaker_layout, write_dataset

MODEL, REPO, BUCKET = "tiny-flux1", "loopback/tiny-flux1", "bench-artifacts"
STEPS = 1  # the trainer prints a step line every few steps and at the last: here the first is the last
FIRST_STEP = "step=1 "


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-hub-") as tmp, moto_server() as url:
        root = Path(tmp)
        _, build = TINY_MODELS[MODEL]
        with LoopbackHub({REPO: build(root / MODEL)}) as hub:
            return _measure(root, hub, url)


def _measure(root: Path, hub: LoopbackHub, url: str) -> list[dict[str, Any]]:
    s3 = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="b", aws_secret_access_key="b"
    )
    s3.create_bucket(Bucket=BUCKET)
    store, commit = MirrorStore(s3, BUCKET), hub.commit(REPO)
    reference = pinned(REPO, commit)
    env = _environment(hub, url)

    hub_only = _time_to_first_step(root / "hub", reference, env)
    assert store.acquire_lease(REPO, commit, "bench-first", ttl_seconds=600)
    hub.reset_counters()
    publishing = _time_to_first_step(root / "first", reference, env, mirror=store.uri(REPO, commit))
    first_bytes = hub.bytes_served
    hub.reset_counters()
    started = time.monotonic()
    channel = _download_channel(
        s3, mirror_prefix(REPO, commit), root / "second" / "input" / "data" / BASE_MODEL_CHANNEL
    )
    cached = (time.monotonic() - started) + _time_to_first_step(root / "second", reference, env)
    second_bytes = hub.bytes_served
    setup = f"tiny FLUX.1 ({first_bytes / 1e6:.1f} MB), {STEPS} training step, CPU, loopback Hub, moto S3"
    return [
        {
            "name": "hub_bytes_second_job",
            "value": second_bytes,
            "unit": "bytes",
            "target": 0,
            "notes": f"{setup}; the first job got {first_bytes} bytes from the Hub and published the copy;"
            f" the second got the copy ({channel} files) as its {BASE_MODEL_CHANNEL} channel",
        },
        {
            "name": "time_to_first_step_cached_vs_hub",
            "value": round(cached / hub_only, 3),
            "unit": "ratio",
            "target": None,
            "notes": f"{setup}; job start to first step: {cached:.2f} s from the stack's copy (its S3"
            f" download included) / {hub_only:.2f} s downloading from the Hub; the first job, which also"
            f" publishes the copy before training, {publishing:.2f} s",
        },
    ]


def _environment(hub: LoopbackHub, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "LORAFLOW_", "HF_", "AWS_"))}
    return env | {
        "HF_ENDPOINT": hub.endpoint,
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "b",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_DEFAULT_REGION": "us-east-1",
        "OMP_NUM_THREADS": "1",
    }


def _time_to_first_step(root: Path, reference: str, env: dict[str, str], mirror: str = "") -> float:
    """Seconds from starting the trainer to its first step's line (an empty model cache each time)."""
    dataset = write_dataset(root / "input" / "data" / "dataset", STEPS, "")
    config_dir = root / "input" / "config"
    config_dir.mkdir(parents=True)
    hyperparameters = {
        "config_file": CONFIG_FILE,
        "base_model": reference,
        "job_id": root.name,
        "base_model_mirror": mirror,
    }
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    layout = sagemaker_layout(root, dataset) | {"HF_HOME": str(root / "hf")}
    started = time.monotonic()
    with (root / "stderr.log").open("wb") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "loraflow_training", "train"],
            env=env | layout,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        assert process.stdout is not None
        first = next((time.monotonic() for line in process.stdout if line.startswith(FIRST_STEP)), None)
        process.stdout.read()
        if process.wait() != 0 or first is None:
            raise RuntimeError(f"training failed:\n{(root / 'stderr.log').read_text()[-3000:]}")
    return first - started


def _download_channel(s3: Any, prefix: str, channel: Path) -> int:
    """What SageMaker does with an S3Prefix channel in File mode before the container starts."""
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    for key in keys:
        target = channel / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, key, str(target))
    return len(keys)
