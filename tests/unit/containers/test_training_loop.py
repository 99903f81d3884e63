from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusion_kit import TrainingRun, make_sagemaker_dirs
from loraflow_diffusion.families import family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny import build_tiny_sd
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_training.__main__ import main
from loraflow_training.data import load_images, scan_dataset
from loraflow_training.train import shuffled_batches, train_lora


def test_given_half_precision_base_when_trained_then_lora_weights_stay_fp32(
    tiny_model: Path, training_run: TrainingRun, tmp_path: Path
) -> None:
    # bf16 weights exercise the GPU code path (autocast, fp32 LoRA params) on the CPU.
    pipe = load_pipeline(
        str(tiny_model), device=torch.device("cpu"), dtype=torch.bfloat16, cache_dir=tmp_path
    )
    training_set = scan_dataset(training_run.dirs.dataset)
    pixels = load_images(training_run.dirs.dataset, training_set.samples, (64, 64))
    config = TrainingConfig(resolution=(64, 64), max_train_steps=3, train_batch_size=2, network_dim=2)

    outcome = train_lora(
        pipe, family_of(pipe), pixels, [s.caption for s in training_set.samples], training_set.epoch(), config
    )

    assert outcome.steps == 3 and outcome.final_loss > 0
    trained = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16


def test_given_base_model_with_nan_weights_when_trained_then_training_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_sd(tmp_path / "nan-model")
    pipe = StableDiffusionPipeline.from_pretrained(model)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    pipe.save_pretrained(model)
    dirs = make_sagemaker_dirs(tmp_path / "job", str(model))
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)

    exit_code = main(["train"])

    assert exit_code == 1
    assert dirs.failure["code"] == "TRAINING_FAILED"
    assert "loss became nan by step 10" in dirs.failure["message"]


def test_given_epoch_when_batched_then_every_index_once_per_epoch_and_short_last_batch() -> None:
    epoch = [0, 0, 1, 2, 2, 2, 3]
    batches = shuffled_batches(epoch, batch_size=3, generator=torch.Generator().manual_seed(0))

    first_epoch = [next(batches) for _ in range(3)]

    assert [len(batch) for batch in first_epoch] == [3, 3, 1]
    assert sorted(torch.cat(first_epoch).tolist()) == sorted(epoch)
