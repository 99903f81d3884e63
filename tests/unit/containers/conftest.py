"""Fixtures for the diffusion containers: the tiny model (built once), moto S3, and one real training
run (through the entrypoint) whose LoRA the inference tests reuse."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusion_kit import REGION, TrainingRun, make_sagemaker_dirs
from loraflow_diffusion.tiny import build_tiny_sd
from moto import mock_aws


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def training_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> TrainingRun:
    """One real run of `python -m loraflow_training train`, in-process, on the tiny model."""
    from loraflow_training.__main__ import main

    dirs = make_sagemaker_dirs(tmp_path_factory.mktemp("training"), str(tiny_model))
    capture = tmp_path_factory.mktemp("stdout") / "stdout.txt"
    with pytest.MonkeyPatch.context() as patch, capture.open("w") as sink:
        for name, value in dirs.env().items():
            patch.setenv(name, value)
        patch.setattr("sys.stdout", sink)
        exit_code = main(["train"])
    return TrainingRun(dirs, exit_code, capture.read_text())


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield
