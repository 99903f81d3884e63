"""The effect check after training: a trained LoRA moves the training prompts' images past the threshold,
an untrained (zero) LoRA does not and earns `WEAK_LORA`; the adapters are left enabled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusion_kit import TrainingRun
from loraflow_shared.errors import ErrorCode
from loraflow_training.effect import MAX_PROMPTS, WEAK_LORA_THRESHOLD, EffectReport, lora_effect
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

# The captions the entrypoint's training run used (diffusion_kit's dataset): image captions and defaults.
TRAINING_PROMPTS = ["ohwx, a red circle", "ohwx", "sks dog, a red circle", "sks dog"]
STEPS, RESOLUTION, SEED = 4, (64, 64), 0


def _pipe(tiny_model: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with_zero_lora(tiny_model: Path) -> StableDiffusionPipeline:
    """A LoRA as peft initialises it (up weights zero): present, trainable, and without any effect."""
    pipe = _pipe(tiny_model)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return pipe


def test_given_trained_lora_when_effect_measured_then_above_threshold_and_no_warning(
    training_run: TrainingRun, tiny_model: Path
) -> None:
    assert training_run.exit_code == 0, training_run.stdout
    pipe = _pipe(tiny_model)
    pipe.load_lora_weights(training_run.dirs.model)

    effect = lora_effect(pipe, TRAINING_PROMPTS, SEED, STEPS, RESOLUTION)

    # Measured 0.025 (6x the threshold) when the threshold was set; see effect.WEAK_LORA_THRESHOLD.
    assert effect.mean_abs_difference > 2 * WEAK_LORA_THRESHOLD
    assert not effect.weak and effect.warning() is None
    assert all(value > 0 for value in effect.per_prompt.values())


def test_given_zero_initialised_lora_when_effect_measured_then_weak_lora_warning(tiny_model: Path) -> None:
    effect = lora_effect(_with_zero_lora(tiny_model), TRAINING_PROMPTS[:2], SEED, 2, RESOLUTION)

    assert effect.mean_abs_difference == 0.0
    warning = effect.warning()
    assert effect.weak and warning is not None
    assert warning.code == ErrorCode.WEAK_LORA and warning.is_warning
    assert "learning_rate" in warning.message and f"{WEAK_LORA_THRESHOLD:g}" in warning.message


def test_given_effect_measured_when_done_then_adapters_enabled_and_modes_restored(tiny_model: Path) -> None:
    pipe = _with_zero_lora(tiny_model)
    pipe.unet.train()

    lora_effect(pipe, ["ohwx"], SEED, 1, RESOLUTION)

    lora_layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert lora_layers and not any(layer.disable_adapters for layer in lora_layers)
    assert pipe.unet.training and not pipe.vae.training


def test_given_many_repeated_prompts_when_measured_then_distinct_prompts_capped(tiny_model: Path) -> None:
    prompts = [f"prompt {i % 6}" for i in range(30)]

    effect = lora_effect(_with_zero_lora(tiny_model), prompts, SEED, 1, RESOLUTION)

    assert list(effect.per_prompt) == [f"prompt {i}" for i in range(MAX_PROMPTS)]


def test_given_no_prompts_when_measured_then_value_error(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        lora_effect(_pipe(tiny_model), [], SEED, STEPS, RESOLUTION)


def test_given_effect_report_when_serialised_then_weak_flag_included_and_parses_back() -> None:
    report = EffectReport(
        mean_abs_difference=0.001,
        per_prompt={"ohwx": 0.001},
        threshold=WEAK_LORA_THRESHOLD,
        steps=STEPS,
        resolution=RESOLUTION,
        seed=SEED,
    )

    data = report.model_dump(mode="json")

    assert data["weak"] is True
    assert EffectReport.model_validate(data) == report


def test_given_text_encoder_only_lora_when_measured_then_effect_seen(tiny_model: Path) -> None:
    pipe = _pipe(tiny_model)
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in pipe.text_encoder.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)

    effect = lora_effect(pipe, ["ohwx"], SEED, 2, RESOLUTION)

    assert effect.mean_abs_difference > WEAK_LORA_THRESHOLD
