from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusion_kit import CONFIG_FILE, SUBSETS, TRAIN_STEPS, TrainingRun, make_sagemaker_dirs
from loraflow_shared.contracts import TrainingReport
from loraflow_training.__main__ import main
from loraflow_training.data import scan_dataset
from safetensors.torch import load_file


def _render(pipe: StableDiffusionPipeline) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    result = pipe(
        "ohwx, a red circle",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    )
    return np.asarray(result.images[0])


def _run_main(dirs_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    for name, value in dirs_env.items():
        monkeypatch.setenv(name, value)
    return main(["train"])


def test_given_dataset_when_trained_then_exit_0_with_lora_and_report(training_run: TrainingRun) -> None:
    assert training_run.exit_code == 0, training_run.stdout
    assert not (training_run.dirs.output / "failure").exists()
    weights = load_file(training_run.dirs.model / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("unet.") and "lora" in key for key in weights)
    report = TrainingReport.model_validate_json(
        (training_run.dirs.model / "training_report.json").read_text()
    )
    assert report.steps == TRAIN_STEPS
    assert report.final_loss is not None and report.final_loss > 0
    extra = report.model_extra or {}
    assert extra["images"] == 7 and extra["repeats"] == {"3_ohwx": 3, "2_sks dog": 2}
    assert extra["samples_per_epoch"] == 17
    assert extra["device"] == "cpu" and extra["dtype"] == "float32"  # bf16 asked, but CPU trains in fp32
    assert report.ignored_keys == []  # the kit config uses cache_latents, which is honoured now


def test_given_training_when_running_then_step_and_loss_lines_printed(training_run: TrainingRun) -> None:
    lines = re.findall(r"^step=(\d+) loss=(\d+\.\d+)$", training_run.stdout, flags=re.MULTILINE)

    assert [int(step) for step, _ in lines] == [10, TRAIN_STEPS]
    assert all(float(loss) > 0 for _, loss in lines)


def test_given_trained_lora_when_loaded_into_base_then_output_changes(
    training_run: TrainingRun, tiny_model: Path
) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe)

    pipe.load_lora_weights(training_run.dirs.model)
    with_lora = _render(pipe)

    assert pipe.unet.peft_config["default_0"].lora_alpha == 2  # from the config, not the rank (4)
    assert base.shape == with_lora.shape == (64, 64, 3)
    assert np.abs(base - with_lora).max() > 1e-3


def test_given_subsets_with_repeats_when_scanned_then_epoch_repeats_each_image(
    training_run: TrainingRun,
) -> None:
    training_set = scan_dataset(training_run.dirs.dataset)

    epoch = training_set.epoch()

    assert len(epoch) == sum(int(folder.split("_")[0]) * count for folder, count in SUBSETS.items())
    for index, sample in enumerate(training_set.samples):
        assert epoch.count(index) == sample.subset.repeats


def test_given_caption_files_when_scanned_then_used_else_folder_caption(training_run: TrainingRun) -> None:
    captions = {sample.image: sample.caption for sample in scan_dataset(training_run.dirs.dataset).samples}

    assert captions["3_ohwx/img0.png"] == "ohwx, a red circle"
    assert captions["3_ohwx/img1.png"] == "ohwx"
    assert captions["2_sks dog/img1.png"] == "sks dog"


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
