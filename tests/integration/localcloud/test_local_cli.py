"""The `loraflow` command: `local up` as a user runs it (a process, stopped with Ctrl-C) and `validate`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
from loraflow_local.cli import main
from loraflow_local.sample_dataset import write_sample_dataset
from PIL import Image

pytestmark = pytest.mark.integration


def _local_up(state: Path, *options: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "loraflow_local.cli",
        "local",
        "up",
        "--state-dir",
        str(state),
        "--settle-seconds",
        "1",
        "--parameter",
        "DefaultBaseModel=s3://elsewhere/base/",
        *options,
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _endpoints(process: subprocess.Popen[bytes], state: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while not (state / "endpoints.json").is_file():
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "endpoints.json never appeared"
        time.sleep(0.2)
    endpoints: dict[str, Any] = json.loads((state / "endpoints.json").read_text())
    return endpoints


def test_given_local_up_when_interrupted_then_endpoints_served_then_clean_exit(tmp_path: Path):
    state = tmp_path / "state"
    process = _local_up(state)
    try:
        endpoints = _endpoints(process, state)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(endpoints["api_url"] + "/jobs", timeout=10)
        assert (refused.value.code, json.loads(refused.value.read())) == (403, {"message": "Forbidden"})
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert f"api_url: {endpoints['api_url']}" in stderr.decode()
    with pytest.raises(OSError):  # the moto server is gone with the process
        urllib.request.urlopen(endpoints["aws_endpoint_url"], timeout=2)
    assert not (state / "endpoints.json").exists()
    assert json.loads((state / "saved" / "state.json").read_text())["cloud"]["api_keys"]


def test_given_cloud_killed_hard_when_started_again_then_what_it_saved_periodically_is_back(tmp_path: Path):
    # Given a cloud saving every half second, holding an object, then killed without a chance to save
    state = tmp_path / "state"
    first = _local_up(state, "--save-interval", "0.5")
    try:
        endpoints = _endpoints(first, state)
        s3 = _s3(endpoints)
        s3.put_object(Bucket=endpoints["artifacts_bucket"], Key="jobs/j1/lora.safetensors", Body=b"weights")
        deadline = time.monotonic() + 20
        while "jobs/j1/lora.safetensors" not in _saved_text(state):
            assert time.monotonic() < deadline, "no periodic save"
            time.sleep(0.2)
    finally:
        first.kill()
        first.communicate(timeout=30)
    assert (state / "endpoints.json").exists()  # a crashed cloud cannot clean up: the next start rewrites it
    (state / "endpoints.json").unlink()

    # When it is started again and then stopped with SIGTERM
    second = _local_up(state)
    try:
        restarted = _endpoints(second, state)
        body = _s3(restarted).get_object(Bucket=endpoints["artifacts_bucket"], Key="jobs/j1/lora.safetensors")
        content = body["Body"].read()
    finally:
        second.send_signal(signal.SIGTERM)
        _, stderr = second.communicate(timeout=60)

    # Then the object is back, and the second stop was clean
    assert content == b"weights"
    assert second.returncode == 0, stderr.decode()[-2000:]
    assert "restored the state saved at" in stderr.decode()
    assert not (state / "endpoints.json").exists()


def _s3(endpoints: dict[str, Any]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoints["aws_endpoint_url"],
        region_name=endpoints["region"],
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )


def _saved_text(state: Path) -> str:
    try:
        return (state / "saved" / "state.json").read_text()
    except FileNotFoundError:
        return ""


def test_given_unknown_parameter_when_local_up_then_error_names_it_and_environment_restored(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    before = dict(os.environ)
    code = main(["local", "up", "--state-dir", str(tmp_path), "--parameter", "NoSuchParameter=1"])
    assert code == 2
    assert "NoSuchParameter" in capsys.readouterr().err
    assert dict(os.environ) == before


def test_given_good_dataset_folder_when_validated_then_accepted_exit_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    dataset = write_sample_dataset(tmp_path)
    assert main(["validate", str(dataset)]) == 0
    output = capsys.readouterr().out
    assert "0001-dataset: accepted; 16 images" in output
    assert "IGNORED_CONFIG_KEY" in output


def test_given_broken_dataset_folder_when_validated_then_every_error_listed_exit_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
):
    dataset = write_sample_dataset(tmp_path)
    (dataset / "10_dwjz" / "img01.png").write_bytes(b"not an image")
    Image.new("RGB", (32, 32)).save(dataset / "10_dwjz" / "img02.png")
    assert main(["validate", str(dataset)]) == 1
    output = capsys.readouterr().out
    assert "UNSUPPORTED_FORMAT" in output and "10_dwjz/img01.png" in output
    assert "IMAGE_TOO_SMALL" in output and "10_dwjz/img02.png" in output
    assert "rejected" in output


def test_given_missing_folder_when_validated_then_exit_two(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["validate", str(tmp_path / "absent")]) == 2
    assert "is not a folder" in capsys.readouterr().err
