"""What SD training guarantees (test_resume_training, test_distributed_training, the NaN guard), for every
flow-matching family: a killed run resumes to the LoRA an uninterrupted run makes, two data-parallel
processes make the LoRA one process makes, and a base that produces NaN fails with NAN_LOSS and no LoRA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_kit import CONFIG_FILE, SageMakerDirs, kill_after_first_checkpoint, make_sagemaker_dirs
from loraflow_diffusion.families import FlowMatchingObjective, family_named, family_of
from loraflow_diffusion.tiny_models import TINY_MODELS
from loraflow_training.__main__ import main
from loraflow_training.checkpointing import CheckpointStore
from loraflow_training.report import TrainingReportV2
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # trains tiny diffusion models, in subprocesses too

FLOW_MODELS = [
    name
    for name, (family, _) in TINY_MODELS.items()
    if isinstance(family_named(family).objective, FlowMatchingObjective)
]
STEPS, EVERY = 8, 2
# Two processes cost ~18 s a family (three interpreters start). Sharding and gradient averaging happen
# before and after the family's predict, so two families with the most different inputs are run: FLUX.1
# (packed latents, guidance, pooled CLIP) and Qwen-Image (per-caption attention masks); the suite's
# 20-minute budget leaves no room for all four.
DATA_PARALLEL_MODELS = ("tiny-flux1", "tiny-qwen_image")
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module", params=FLOW_MODELS)
def flow_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, build = TINY_MODELS[request.param]
    return build(tmp_path_factory.mktemp("flow") / request.param)


def _job(root: Path, model: Path, batch: int = 2) -> SageMakerDirs:
    dirs = make_sagemaker_dirs(root, str(model))
    config = dirs.dataset / CONFIG_FILE
    text = config.read_text().replace("max_train_steps = 12", f"max_train_steps = {STEPS}")
    text = text.replace("train_batch_size = 2", f"train_batch_size = {batch}")
    # Shuffled captions re-encode each step (the LLM encoders too); T5's 512 tokens only slow FLUX.1 down.
    extra = ["shuffle_caption = true", "flip_aug = true", "t5xxl_max_token_length = 32"]
    config.write_text(text + "\n".join([f"save_every_n_steps = {EVERY}", *extra]) + "\n")
    return dirs


def _train_in_process(dirs: SageMakerDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)
    assert main(["train"]) == 0, (
        (dirs.output / "failure").read_text() if (dirs.output / "failure").exists() else ""
    )


@pytest.fixture(scope="module")
def uninterrupted(flow_model: Path, tmp_path_factory: pytest.TempPathFactory) -> SageMakerDirs:
    """One process, batch 2, never stopped: the run both the resumed and the data-parallel runs must match."""
    dirs = _job(tmp_path_factory.mktemp("uninterrupted"), flow_model)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _train_in_process(dirs, monkeypatch)
    return dirs


def _assert_same_lora(ours: Path, reference: Path, atol: float, rtol: float) -> None:
    mine, theirs = load_file(ours / LORA_FILE), load_file(reference / LORA_FILE)
    assert mine.keys() == theirs.keys() and mine
    for key, value in theirs.items():
        assert torch.allclose(mine[key], value, atol=atol, rtol=rtol), key


def test_given_killed_flow_family_training_when_restarted_then_resumes_and_matches_uninterrupted(
    tmp_path: Path, flow_model: Path, uninterrupted: SageMakerDirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted = _job(tmp_path / "interrupted", flow_model)
    kill_after_first_checkpoint(interrupted)
    saved = CheckpointStore(interrupted.root / "checkpoints" / "state").latest()
    assert saved is not None and 0 < saved[0] < STEPS

    _train_in_process(interrupted, monkeypatch)

    report = TrainingReportV2.model_validate_json((interrupted.model / "training_report.json").read_text())
    assert report.resumed_from_step == saved[0] and report.steps == STEPS
    _assert_same_lora(interrupted.model, uninterrupted.model, atol=1e-6, rtol=1e-4)


def test_given_two_processes_on_a_flow_family_when_trained_then_lora_matches_one_process(
    tmp_path: Path, flow_model: Path, uninterrupted: SageMakerDirs
) -> None:
    if flow_model.name not in DATA_PARALLEL_MODELS:
        pytest.skip(f"{flow_model.name}: data parallel is checked on {', '.join(DATA_PARALLEL_MODELS)}")
    two = _job(tmp_path / "two", flow_model, batch=1)
    result = subprocess.run(
        [sys.executable, "-m", "loraflow_training", "train"],
        env={**os.environ, **two.env(), "LORAFLOW_NUM_PROCESSES": "2"},
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    report = TrainingReportV2.model_validate_json((two.model / "training_report.json").read_text())
    assert report.processes == 2
    # The same global batch (2) in one process: gradients averaged over processes are the batch's.
    _assert_same_lora(two.model, uninterrupted.model, atol=1e-5, rtol=1e-3)


def test_given_flow_family_base_producing_nan_when_trained_then_nan_loss_and_no_lora(
    tmp_path: Path, flow_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "nan-model"
    pipe: Any = DiffusionPipeline.from_pretrained(flow_model)
    denoiser = family_of(pipe).denoiser(pipe)
    with torch.no_grad():
        first = next(m for m in denoiser.modules() if isinstance(m, torch.nn.Linear))  # some have no bias
        first.weight.fill_(float("nan"))
    pipe.save_pretrained(model)
    dirs = _job(tmp_path / "job", model)
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)

    exit_code = main(["train"])

    assert exit_code == 1
    assert dirs.failure["code"] == "NAN_LOSS" and "loss became nan at step 1" in dirs.failure["message"]
    assert not any(dirs.model.glob("*.safetensors"))
    assert not (dirs.root / "checkpoints" / "state").exists()


def test_given_fp8_base_on_a_flow_family_when_trained_then_it_trains_in_the_compute_dtype_and_delivers(
    tmp_path: Path, flow_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = _job(tmp_path / "job", flow_model)
    config = dirs.dataset / CONFIG_FILE
    config.write_text(config.read_text() + "fp8_base = true\n")

    _train_in_process(dirs, monkeypatch)

    report = TrainingReportV2.model_validate_json((dirs.model / "training_report.json").read_text())
    assert report.config.fp8_base and report.dtype == "float32"  # computed upcast, stored in float8
    assert report.loss is not None and report.steps == STEPS
    lora = load_file(dirs.model / LORA_FILE)
    assert lora and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora.values())
