"""The training loop on the tiny SD pipeline: precision, text-encoder LoRA, accumulation, the step modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from loraflow_diffusion.families import family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_training.data import TrainingData, load_training_data
from loraflow_training.distributed import make_accelerator
from loraflow_training.train import RunSettings, TrainingOutcome, train_lora
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

BASE = {"resolution": (64, 64), "network_dim": 2, "learning_rate": 1e-2, "seed": 5}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 images x 2 repeats = 8 samples: batches of 2 are always full."""
    root = tmp_path_factory.mktemp("loop-data")
    folder = root / "2_ohwx"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB").save(
            folder / f"{index}.png"
        )
        (folder / f"{index}.txt").write_text(f"ohwx, red, square {index}, photo", encoding="utf-8")
    return root


def _pipe(model: Path, tmp_path: Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    pipe = load_pipeline(str(model), device=torch.device("cpu"), dtype=dtype, cache_dir=tmp_path)
    assert isinstance(pipe, StableDiffusionPipeline)
    return pipe


def _train(
    pipe: StableDiffusionPipeline, data: TrainingData, config: TrainingConfig, **run: object
) -> TrainingOutcome:
    settings = {
        "batch_size": 2,
        "optimizer": "AdamW",
        "gradient_checkpointing": False,
        "cache_latents": True,
        "train_text_encoder": False,
        "clip_skip": config.clip_skip,
        "total_steps": config.max_train_steps,
        **run,
    }
    accelerator = make_accelerator(pipe.unet.dtype, config.gradient_accumulation_steps)
    return train_lora(pipe, family_of(pipe), data, config, RunSettings(**settings), accelerator)  # type: ignore[arg-type]


def _lora_b(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA up-projections: gaussian init leaves them at zero, so any non-zero value was learned."""
    return {k: v for k, v in get_peft_model_state_dict(module).items() if "lora_B" in k}


def test_given_half_precision_base_when_trained_then_lora_weights_stay_fp32(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    # bf16 weights exercise the GPU code path (accelerate's autocast, fp32 LoRA params) on the CPU.
    pipe = _pipe(tiny_model, tmp_path, torch.bfloat16)
    config = TrainingConfig(**BASE, max_train_steps=3)  # type: ignore[arg-type]

    outcome = _train(pipe, load_training_data(dataset, config), config, train_text_encoder=True)

    assert outcome.steps == 3 and np.isfinite(outcome.final_loss)
    for module in (pipe.unet, pipe.text_encoder):
        trained = [p for p in module.parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained)
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16


def test_given_fp8_base_when_trained_then_frozen_layers_are_stored_in_float8_and_the_lora_learns_in_fp32(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    pipe = _pipe(tiny_model, tmp_path)
    config = TrainingConfig(**BASE, max_train_steps=4)  # type: ignore[arg-type]

    outcome = _train(pipe, load_training_data(dataset, config), config, fp8_base=True)

    assert outcome.steps == 4 and np.isfinite(outcome.final_loss)
    adapted = [module for module in pipe.unet.modules() if isinstance(module, BaseTunerLayer)]
    stored = [m.base_layer.parametrizations.weight.original for m in adapted]  # upcast on each use
    assert adapted and all(weight.dtype == torch.float8_e4m3fn for weight in stored)
    assert pipe.unet.conv_in.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    assert pipe.unet.conv_in.weight.dtype == torch.float32  # what the layer computes with
    trained = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    learned = _lora_b(pipe.unet)
    assert learned and all(value.abs().max() > 0 for value in learned.values())


def test_given_text_encoder_lora_when_trained_then_both_networks_learn(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    pipe = _pipe(tiny_model, tmp_path)
    config = TrainingConfig(**BASE, max_train_steps=2, text_encoder_lr=5e-3)  # type: ignore[arg-type]

    _train(pipe, load_training_data(dataset, config), config, train_text_encoder=True)

    for module in (pipe.unet, pipe.text_encoder):
        learned = _lora_b(module)
        assert learned and all(value.abs().max() > 0 for value in learned.values())


def test_given_unet_only_when_trained_then_text_encoder_has_no_adapter(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    pipe = _pipe(tiny_model, tmp_path)
    config = TrainingConfig(**BASE, max_train_steps=2)  # type: ignore[arg-type]

    _train(pipe, load_training_data(dataset, config), config, train_text_encoder=False)

    assert not getattr(pipe.text_encoder, "peft_config", None)
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    assert all(value.abs().max() > 0 for value in _lora_b(pipe.unet).values())


def test_given_gradient_accumulation_when_trained_then_each_step_sees_that_many_batches(
    tiny_model: Path, dataset: Path, tmp_path: Path
) -> None:
    pipe = _pipe(tiny_model, tmp_path)
    config = TrainingConfig(**BASE, max_train_steps=3, gradient_accumulation_steps=2)  # type: ignore[arg-type]

    outcome = _train(pipe, load_training_data(dataset, config), config)

    assert outcome.images_per_bucket == {"64x64": 3 * 2 * 2}  # steps x accumulation x batch
    assert outcome.epochs == 1.5 and len(outcome.step_losses) == 3


@pytest.mark.parametrize(
    ("keys", "run"),
    [
        # per-step captions (shuffle) through frozen encoders, latents encoded every step, flips
        ({"shuffle_caption": True, "keep_tokens": 1, "flip_aug": True}, {"cache_latents": False}),
        # cached flipped latents, caption dropout, Min-SNR, noise offset, warmup + cosine, Adafactor
        (
            {
                "flip_aug": True,
                "caption_dropout_rate": 0.5,
                "min_snr_gamma": 5.0,
                "noise_offset": 0.1,
                "lr_scheduler": "cosine",
                "lr_warmup_steps": 0.5,
                "clip_skip": 2,
            },
            {"optimizer": "Adafactor"},
        ),
        # trained encoders with cached token ids, gradient checkpointing on both networks
        ({"max_grad_norm": 0.0}, {"train_text_encoder": True, "gradient_checkpointing": True}),
    ],
)
def test_given_step_options_when_trained_then_loss_finite_and_unet_lora_learns(
    tiny_model: Path, dataset: Path, tmp_path: Path, keys: dict[str, object], run: dict[str, object]
) -> None:
    pipe = _pipe(tiny_model, tmp_path)
    config = TrainingConfig(**BASE, max_train_steps=2, **keys)  # type: ignore[arg-type]

    outcome = _train(pipe, load_training_data(dataset, config), config, **run)

    assert len(outcome.step_losses) == 2 and all(np.isfinite(outcome.step_losses))
    assert all(value.abs().max() > 0 for value in _lora_b(pipe.unet).values())
    if run.get("gradient_checkpointing"):
        assert pipe.unet.is_gradient_checkpointing
