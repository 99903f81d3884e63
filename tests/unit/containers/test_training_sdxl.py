"""The SDXL family end to end on a tiny SDXL pipeline: pooled text embeddings and time ids reach the UNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusion_kit import make_sagemaker_dirs
from loraflow_diffusion.families import family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny import build_tiny_sdxl
from loraflow_shared.contracts import TrainingReport
from loraflow_training.__main__ import main

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


def _render(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    result = pipe("ohwx", num_inference_steps=3, height=64, width=64, generator=generator, output_type="np")
    return np.asarray(result.images[0])


def test_given_sdxl_dir_when_loaded_then_sdxl_family(tiny_sdxl: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(tiny_sdxl), device=torch.device("cpu"), dtype=torch.float32, cache_dir=tmp_path)

    assert isinstance(pipe, StableDiffusionXLPipeline)
    conditioning = family_of(pipe).encode_prompts(pipe, ["ohwx", "sks dog"], (64, 48))
    assert conditioning.encoder_hidden_states.shape == (2, 77, 32 + 48)  # both encoders, concatenated
    assert conditioning.added_cond_kwargs["text_embeds"].shape == (2, 48)  # the second encoder's pooled
    assert conditioning.added_cond_kwargs["time_ids"].tolist() == [[48, 64, 0, 0, 48, 64]] * 2  # (h, w) pairs


def test_given_sdxl_base_when_trained_then_lora_loads_and_changes_output(
    tiny_sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = make_sagemaker_dirs(tmp_path, str(tiny_sdxl))
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)

    exit_code = main(["train"])

    assert exit_code == 0
    report = TrainingReport.model_validate_json((dirs.model / "training_report.json").read_text())
    assert (report.model_extra or {})["model_family"] == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe)
    pipe.load_lora_weights(dirs.model)
    assert np.abs(_render(pipe) - base).max() > 1e-3
