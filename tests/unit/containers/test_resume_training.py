"""Spot interruption: a training killed mid-run resumes from its last checkpoint and ends where an
uninterrupted run ends (same data order and random draws after the resume)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusion_kit import CONFIG_FILE, SageMakerDirs, kill_after_first_checkpoint, make_sagemaker_dirs
from loraflow_training.__main__ import main
from loraflow_training.checkpointing import CheckpointStore
from loraflow_training.report import TrainingReportV2
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

STEPS, EVERY = 16, 4
LORA_FILE = "pytorch_lora_weights.safetensors"


def _job(root: Path, model: Path) -> SageMakerDirs:
    dirs = make_sagemaker_dirs(root, str(model))
    config = dirs.dataset / CONFIG_FILE
    text = config.read_text().replace("max_train_steps = 12", f"max_train_steps = {STEPS}")
    config.write_text(text + f"save_every_n_steps = {EVERY}\nshuffle_caption = true\nflip_aug = true\n")
    return dirs


def _train_in_process(
    dirs: SageMakerDirs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)
    assert main(["train"]) == 0
    return capsys.readouterr().out


def test_given_killed_training_when_restarted_then_resumes_from_checkpoint_and_matches_uninterrupted(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupted = _job(tmp_path / "interrupted", tiny_model)
    kill_after_first_checkpoint(interrupted)
    saved = CheckpointStore(interrupted.root / "checkpoints" / "state").latest()
    assert saved is not None and not (interrupted.model / LORA_FILE).exists()
    checkpoint_step = saved[0]
    assert checkpoint_step % EVERY == 0 and 0 < checkpoint_step < STEPS

    resumed_log = _train_in_process(interrupted, monkeypatch, capsys)
    uninterrupted = _job(tmp_path / "uninterrupted", tiny_model)
    _train_in_process(uninterrupted, monkeypatch, capsys)

    report = TrainingReportV2.model_validate_json((interrupted.model / "training_report.json").read_text())
    assert report.resumed_from_step == checkpoint_step and report.steps == STEPS
    logged = [int(step) for step in re.findall(r"^step=(\d+) ", resumed_log, flags=re.MULTILINE)]
    assert logged and min(logged) > checkpoint_step  # no step before the checkpoint ran again
    resumed, reference = load_file(interrupted.model / LORA_FILE), load_file(uninterrupted.model / LORA_FILE)
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.allclose(resumed[key], value, atol=1e-6, rtol=1e-4), key


def test_given_sigterm_when_training_then_checkpoint_at_the_stop_step_and_exit_1(
    tmp_path: Path, tiny_model: Path
) -> None:
    dirs = _job(tmp_path, tiny_model)
    process = subprocess.Popen(
        [sys.executable, "-m", "loraflow_training", "train"],
        env={**os.environ, **dirs.env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = dirs.root / "checkpoints" / "progress.json"  # written after the first step
    deadline = time.monotonic() + 300
    while not progress.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)

    process.send_signal(signal.SIGTERM)  # what SageMaker sends to stop a job, 120 s before SIGKILL

    assert process.wait(timeout=120) == 1
    assert dirs.failure["code"] == "TRAINING_FAILED"
    stopped_after = int(re.findall(r"stopped \(SIGTERM\) after step (\d+)", dirs.failure["message"])[0])
    saved = CheckpointStore(dirs.root / "checkpoints" / "state").latest()
    assert saved is not None and saved[0] == stopped_after < STEPS
    assert not (dirs.model / LORA_FILE).exists()
