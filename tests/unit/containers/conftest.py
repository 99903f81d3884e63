"""Fixtures for the diffusion containers: the tiny model (built once), moto S3, and one real training
run (through the entrypoint) whose LoRA the inference tests reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusion_kit import TrainingRun, make_sagemaker_dirs
from loraflow_diffusion.tiny import build_tiny_sd


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
