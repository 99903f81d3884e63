"""Data-parallel training: 2 CPU processes (gloo) with batch 1 follow 1 process with batch 2.

The reference is the session's single-process run (`training_run`: batch 2, same dataset, model and
seed). The entrypoint re-runs itself under torch.distributed.run, as it does on a multi-GPU instance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusion_kit import CONFIG_FILE, TrainingRun, make_sagemaker_dirs
from loraflow_training.report import TrainingReportV2
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

LORA_FILE = "pytorch_lora_weights.safetensors"


def _report(model_dir: Path) -> TrainingReportV2:
    return TrainingReportV2.model_validate_json((model_dir / "training_report.json").read_text())


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    dirs = make_sagemaker_dirs(tmp_path_factory.mktemp("ddp"), str(tiny_model))
    config = dirs.dataset / CONFIG_FILE
    config.write_text(config.read_text().replace("train_batch_size = 2", "train_batch_size = 1"))
    env = {**os.environ, **dirs.env(), "LORAFLOW_NUM_PROCESSES": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "loraflow_training", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dirs.model


def test_given_two_processes_when_trained_then_loss_curve_matches_one_process(
    two_process_run: Path, training_run: TrainingRun
) -> None:
    two, one = _report(two_process_run), _report(training_run.dirs.model)

    assert two.processes == 2 and one.processes == 1
    assert two.config.train_batch_size == 1 and one.config.train_batch_size == 2  # same global batch
    assert two.loss is not None and one.loss is not None
    assert [p.step for p in two.loss.curve] == [p.step for p in one.loss.curve] == [10, 12]
    for ours, reference in zip(two.loss.curve, one.loss.curve, strict=True):
        assert ours.loss == pytest.approx(reference.loss, rel=1e-4)
    assert two.images_per_bucket == one.images_per_bucket  # the same samples, in the same order


def test_given_two_processes_when_trained_then_lora_matches_one_process(
    two_process_run: Path, training_run: TrainingRun
) -> None:
    two, one = load_file(two_process_run / LORA_FILE), load_file(training_run.dirs.model / LORA_FILE)

    assert two.keys() == one.keys()
    for key, reference in one.items():
        # Gradients averaged over processes = the gradient of the batch's mean loss (float rounding aside).
        assert torch.allclose(two[key], reference, atol=1e-5, rtol=1e-3), key
