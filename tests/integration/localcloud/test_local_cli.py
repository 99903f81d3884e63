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

import pytest
from loraflow_local.cli import main
from loraflow_local.sample_dataset import write_sample_dataset
from PIL import Image

pytestmark = pytest.mark.integration


def test_given_local_up_when_interrupted_then_endpoints_served_then_clean_exit(tmp_path: Path):
    state = tmp_path / "state"
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
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (state / "endpoints.json").is_file():
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "endpoints.json never appeared"
            time.sleep(0.2)
        endpoints = json.loads((state / "endpoints.json").read_text())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(endpoints["api_url"] + "/jobs", timeout=10)
        assert (refused.value.code, json.loads(refused.value.read())) == (403, {"message": "Forbidden"})
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert f"api_url: {endpoints['api_url']}" in stderr.decode()
    with pytest.raises(OSError):  # the moto server is gone with the process
        urllib.request.urlopen(endpoints["aws_endpoint_url"], timeout=2)


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
    assert "0001-dataset: accepted; 9 images" in output
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
