from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusion_kit import CONFIG_FILE, TRAIN_STEPS, TrainingRun, make_sagemaker_dirs, render_ohwx
from loraflow_diffusion.tiny import build_tiny_sd
from loraflow_shared.contracts import TrainingProgress
from loraflow_training.__main__ import main
from loraflow_training.report import TrainingReportV2
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models


def _report(run: TrainingRun) -> TrainingReportV2:
    return TrainingReportV2.model_validate_json((run.dirs.model / "training_report.json").read_text())


def _run_main(dirs_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    for name, value in dirs_env.items():
        monkeypatch.setenv(name, value)
    return main(["train"])


def test_given_dataset_when_trained_then_exit_0_with_both_lora_files_and_report(
    training_run: TrainingRun,
) -> None:
    assert training_run.exit_code == 0, training_run.stdout
    assert not (training_run.dirs.output / "failure").exists()
    weights = load_file(training_run.dirs.model / "pytorch_lora_weights.safetensors")
    components = {key.split(".", 1)[0] for key in weights}
    # On the CPU the memory plan trains the text encoder's LoRA too.
    assert components == {"unet", "text_encoder"} and all("lora" in key for key in weights)
    kohya = load_file(training_run.dirs.model / "lora.safetensors")
    assert any(key.startswith("lora_unet_") for key in kohya)
    assert any(key.startswith("lora_te_") for key in kohya)
    report = _report(training_run)
    assert report.steps == TRAIN_STEPS and report.final_loss is not None and report.final_loss > 0
    assert report.images == 7 and report.samples_per_epoch == 17
    assert report.trained_components == ["unet", "text_encoder"]
    assert (report.device, report.dtype) == ("cpu", "float32")  # bf16 asked, but CPU trains in fp32
    # As applied: the memory plan's choices filled in (on the CPU: AdamW, no checkpointing).
    assert report.config.optimizer_type == "AdamW" and report.config.gradient_checkpointing is False
    assert report.config.train_batch_size == 2 and report.config.network_train_unet_only is False
    assert report.memory_plan is not None and report.memory_plan["device_memory_bytes"] is None
    assert report.resumed_from_step is None
    assert report.ignored_keys == []  # cache_latents is honoured now


def test_given_training_when_done_then_images_seen_per_bucket_match_steps_and_batch(
    training_run: TrainingRun,
) -> None:
    report = _report(training_run)

    # 12 steps of batch 2 over a 17-sample epoch: its 8 full batches and 1 short one, then 3 batches of
    # the second epoch (one of them may be its short one).
    assert list(report.images_per_bucket) == ["64x64"]
    assert report.images_per_bucket["64x64"] in (17 + 5, 17 + 6)
    assert report.epochs == 2


def test_given_training_when_done_then_progress_file_shows_last_step(training_run: TrainingRun) -> None:
    progress = TrainingProgress.model_validate_json(
        (training_run.dirs.root / "checkpoints" / "progress.json").read_text()
    )

    assert (progress.step, progress.total_steps, progress.eta_seconds) == (TRAIN_STEPS, TRAIN_STEPS, 0.0)
    assert progress.loss is not None and progress.loss > 0


def test_given_training_when_running_then_step_and_loss_lines_printed(training_run: TrainingRun) -> None:
    lines = re.findall(r"^step=(\d+) loss=(\d+\.\d+)$", training_run.stdout, flags=re.MULTILINE)

    assert [int(step) for step, _ in lines] == [10, TRAIN_STEPS]
    assert all(float(loss) > 0 for _, loss in lines)


def test_given_trained_lora_when_loaded_into_base_then_output_changes(
    training_run: TrainingRun, tiny_model: Path
) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    base = render_ohwx(pipe)

    pipe.load_lora_weights(training_run.dirs.model)
    with_lora = render_ohwx(pipe)

    assert pipe.unet.peft_config["default_0"].lora_alpha == 2  # from the config, not the rank (4)
    assert base.shape == with_lora.shape == (64, 64, 3)
    assert np.abs(base - with_lora).max() > 1e-3


def test_given_base_model_with_nan_weights_when_trained_then_nan_loss_and_no_lora(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_sd(tmp_path / "nan-model")
    pipe = StableDiffusionPipeline.from_pretrained(model)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    pipe.save_pretrained(model)
    dirs = make_sagemaker_dirs(tmp_path / "job", str(model))

    exit_code = _run_main(dirs.env(), monkeypatch)

    assert exit_code == 1
    assert dirs.failure["code"] == "NAN_LOSS"
    assert "loss became nan at step 1" in dirs.failure["message"]
    assert not any(dirs.model.glob("*.safetensors"))
    assert not (dirs.root / "checkpoints" / "state").exists()  # nothing non-finite was checkpointed


def test_given_truncated_png_when_trained_then_exit_1_with_unreadable_image(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = make_sagemaker_dirs(tmp_path, str(tiny_model))
    broken = dirs.dataset / "2_sks dog" / "img2.png"
    broken.write_bytes(broken.read_bytes()[:-300])

    exit_code = _run_main(dirs.env(), monkeypatch)

    assert exit_code == 1
    assert dirs.failure["code"] == "UNREADABLE_IMAGE"
    assert dirs.failure["path"] == "2_sks dog/img2.png"
    assert "cannot decode image" in dirs.failure["message"]
    assert not (dirs.model / "pytorch_lora_weights.safetensors").exists()


def test_given_unloadable_base_model_when_trained_then_exit_1_with_model_load_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dirs = make_sagemaker_dirs(tmp_path, "no-such-org/no-such-model")

    exit_code = _run_main(dirs.env(), monkeypatch)

    assert exit_code == 1
    assert dirs.failure["code"] == "MODEL_LOAD_FAILED"
    assert "'no-such-org/no-such-model'" in dirs.failure["message"]
    assert len((dirs.output / "failure").read_text(encoding="utf-8")) <= 1024


def test_given_invalid_config_when_trained_then_exit_1_with_invalid_config(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = make_sagemaker_dirs(tmp_path, str(tiny_model))
    config = dirs.dataset / CONFIG_FILE
    config.write_text(config.read_text().replace("network_dim = 4", "network_dim = 0"), encoding="utf-8")

    exit_code = _run_main(dirs.env(), monkeypatch)

    assert exit_code == 1
    assert (dirs.failure["code"], dirs.failure["path"]) == ("INVALID_CONFIG", CONFIG_FILE)
    assert "network_dim" in dirs.failure["message"]


def test_given_missing_hyperparameter_when_trained_then_exit_1_with_internal_error(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = make_sagemaker_dirs(tmp_path, str(tiny_model))
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({"config_file": CONFIG_FILE})
    )

    exit_code = _run_main(dirs.env(), monkeypatch)

    assert exit_code == 1
    assert dirs.failure["code"] == "INTERNAL_ERROR"
    assert "base_model" in dirs.failure["message"] and "job_id" in dirs.failure["message"]


def test_given_unknown_command_when_started_then_usage_and_exit_2() -> None:
    assert main(["serve"]) == 2


def test_given_too_little_memory_for_the_images_when_trained_then_out_of_memory_with_the_plan(
    tmp_path: Path, tiny_model: Path
) -> None:
    # A real out-of-memory: 2048 px images under a 2 GiB address-space limit (a 64 px run fits in it).
    dirs = make_sagemaker_dirs(tmp_path, str(tiny_model))
    config = dirs.dataset / CONFIG_FILE
    config.write_text(config.read_text().replace("resolution = 64", "resolution = 2048"), encoding="utf-8")
    for image in dirs.dataset.rglob("*.png"):
        Image.new("RGB", (2048, 2048), (200, 30, 30)).save(image)

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    result = subprocess.run(
        [sys.executable, "-m", "loraflow_training", "train"],
        env={**os.environ, **dirs.env()},
        capture_output=True,
        timeout=300,
        preexec_fn=limit_memory,
        check=False,
    )

    assert result.returncode == 1
    assert dirs.failure["code"] == "OUT_OF_MEMORY"
    assert "memory plan batch_size=2, gradient_checkpointing=off" in dirs.failure["message"]
    assert not any(dirs.model.glob("*.safetensors"))
