"""kohya's loop options without a model: optimizer, schedule, loss weighting, the run's resolved settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import compute_snr
from loraflow_diffusion.families import StableDiffusion15, StableDiffusionXL, family_named
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_training.data import load_training_data
from loraflow_training.loss import DenoisingObjective
from loraflow_training.memory_plan import plan_memory
from loraflow_training.optim import ParamGroup, build_lr_scheduler, build_optimizer, resolve_optimizer
from loraflow_training.resolve import resolve_run
from PIL import Image
from transformers.optimization import Adafactor

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models


def _groups() -> list[ParamGroup]:
    return [
        ParamGroup("unet", [torch.nn.Parameter(torch.zeros(3))], 1e-3),
        ParamGroup("text_encoder", [torch.nn.Parameter(torch.zeros(2))], 5e-5),
    ]


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )


# --- optimizer and schedule


def test_given_adamw8bit_without_cuda_when_resolved_then_adamw_with_a_message() -> None:
    name, message = resolve_optimizer("AdamW8bit", eight_bit_available=False)

    assert name == "AdamW"
    assert message is not None and message.startswith("optimizer_type: AdamW8bit needs CUDA and bitsandbytes")
    assert resolve_optimizer("Adafactor", eight_bit_available=False) == ("Adafactor", None)


@pytest.mark.parametrize(("name", "kind"), [("AdamW", torch.optim.AdamW), ("Adafactor", Adafactor)])
def test_given_param_groups_when_optimizer_built_then_each_group_keeps_its_rate(
    name: str, kind: type[torch.optim.Optimizer]
) -> None:
    optimizer = build_optimizer(name, _groups())  # type: ignore[arg-type]

    assert isinstance(optimizer, kind)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 5e-5]
    if name == "Adafactor":  # a fixed rate, as kohya's LoRA configs use it
        assert optimizer.param_groups[0]["relative_step"] is False


def _scheduled_rates(
    config: TrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> list[float]:
    """The first group's learning rate at each step of a run under the config's schedule."""
    schedule = build_lr_scheduler(config, optimizer, total_steps=total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_given_fractional_warmup_when_scheduled_then_lr_ramps_over_that_share_then_holds() -> None:
    config = TrainingConfig(lr_scheduler="constant_with_warmup", lr_warmup_steps=0.25)
    optimizer = build_optimizer("AdamW", _groups())

    rates = _scheduled_rates(config, optimizer, total_steps=40)

    assert rates[0] == 0.0 and rates[5] == pytest.approx(1e-3 * 5 / 10)
    assert rates[10:] == [pytest.approx(1e-3)] * 30
    assert optimizer.param_groups[1]["lr"] == pytest.approx(5e-5)  # every group follows the schedule


def test_given_cosine_with_restarts_when_scheduled_then_lr_returns_to_peak_each_cycle() -> None:
    config = TrainingConfig(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2)
    optimizer = build_optimizer("AdamW", _groups())

    rates = _scheduled_rates(config, optimizer, total_steps=20)

    assert rates[0] == rates[10] == pytest.approx(1e-3)
    assert rates[9] < 1e-4 and rates[19] < 1e-4


# --- loss


def test_given_min_snr_gamma_when_loss_weighted_then_only_high_snr_timesteps_are_damped() -> None:
    scheduler = _scheduler()
    objective = DenoisingObjective(scheduler, torch.device("cpu"), min_snr_gamma=5.0)
    plain = DenoisingObjective(scheduler, torch.device("cpu"))
    prediction, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])  # SNR far above 5, and far below

    snr = compute_snr(scheduler, timesteps)
    per_sample = [
        objective.loss(prediction[i : i + 1], target[i : i + 1], timesteps[i : i + 1]) for i in (0, 1)
    ]

    assert snr[0] > 5 > snr[1]
    assert float(per_sample[0]) == pytest.approx(5 / float(snr[0]))
    assert float(per_sample[1]) == pytest.approx(1.0)
    assert float(plain.loss(prediction, target, timesteps)) == pytest.approx(1.0)


def test_given_prior_loss_weight_when_loss_weighted_then_reg_samples_count_that_much() -> None:
    objective = DenoisingObjective(_scheduler(), torch.device("cpu"))
    prediction, target = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    prediction[1] = 3.0  # the reg sample's error is 9

    loss = objective.loss(prediction, target, torch.tensor([5, 5]), sample_weights=torch.tensor([1.0, 0.5]))

    assert float(loss) == pytest.approx((1.0 + 0.5 * 9.0) / 2)


def test_given_noise_offset_when_noise_drawn_then_channels_shift_by_a_constant() -> None:
    offset = DenoisingObjective(_scheduler(), torch.device("cpu"), noise_offset=0.5)
    plain = DenoisingObjective(_scheduler(), torch.device("cpu"))
    shape = torch.Size((64, 4, 16, 16))

    shifted = offset.draw(shape, torch.Generator().manual_seed(0)).noise
    unshifted = plain.draw(shape, torch.Generator().manual_seed(0)).noise

    difference = shifted - unshifted
    # One constant per (sample, channel), 0.5 x a standard normal: spread ~0.5, flat within a channel.
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference), atol=1e-6)
    assert 0.35 < float(difference[:, :, 0, 0].std()) < 0.65


def test_given_v_prediction_model_when_target_taken_then_velocity_not_noise() -> None:
    objective = DenoisingObjective(_scheduler("v_prediction"), torch.device("cpu"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    draw = objective.draw(latents.shape, torch.Generator().manual_seed(2))

    target = objective.target(latents, draw)

    assert not torch.allclose(target, draw.noise)
    alpha = objective.scheduler.alphas_cumprod[draw.timesteps].sqrt()[:, None, None, None]
    sigma = (1 - objective.scheduler.alphas_cumprod[draw.timesteps]).sqrt()[:, None, None, None]
    assert torch.allclose(target, alpha * draw.noise - sigma * latents, atol=1e-5)


# --- the run's settings: plan, hardware, family


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resolve-data")
    (root / "3_ohwx").mkdir()
    for index in range(10):
        Image.fromarray(np.full((64, 64, 3), index * 20, dtype=np.uint8), "RGB").save(
            root / "3_ohwx" / f"{index}.png"
        )
    return root


def test_given_max_train_epochs_when_resolved_then_steps_cover_that_many_epochs(ten_images: Path) -> None:
    config = TrainingConfig(
        resolution=(64, 64), max_train_epochs=4, train_batch_size=4, gradient_accumulation_steps=2
    )
    data = load_training_data(ten_images, config)
    plan = plan_memory(config, family_named("sd15").footprint, config.resolution, None, False)

    run, adjusted = resolve_run(
        config, plan, StableDiffusion15(), data, processes=1, eight_bit_available=False
    )

    # 30 samples per epoch in batches of 4 = 8 batches, 4 optimizer steps of 2 batches: 16 steps.
    assert run.total_steps == 16 and run.batch_size == 4 and adjusted == []


def test_given_two_processes_when_resolved_then_an_epoch_counts_global_batches(ten_images: Path) -> None:
    config = TrainingConfig(resolution=(64, 64), max_train_epochs=1, train_batch_size=3)
    data = load_training_data(ten_images, config)
    plan = plan_memory(config, family_named("sd15").footprint, config.resolution, None, False)

    run, _ = resolve_run(config, plan, StableDiffusion15(), data, processes=2, eight_bit_available=False)

    assert run.total_steps == 5  # 30 samples / (3 per process x 2 processes)


def test_given_clip_skip_and_detected_sdxl_when_resolved_then_ignored_with_a_message(
    ten_images: Path,
) -> None:
    config = TrainingConfig(resolution=(64, 64), clip_skip=2, optimizer_type="AdamW8bit")
    data = load_training_data(ten_images, config)
    plan = plan_memory(config, family_named("sdxl").footprint, config.resolution, None, False)

    run, adjusted = resolve_run(
        config, plan, StableDiffusionXL(), data, processes=1, eight_bit_available=False
    )

    assert run.clip_skip is None and run.optimizer == "AdamW"
    assert [message.split(":")[0] for message in adjusted] == ["optimizer_type", "clip_skip"]


def test_given_save_every_n_steps_when_resolved_then_checkpoints_by_steps_only(ten_images: Path) -> None:
    config = TrainingConfig(resolution=(64, 64), save_every_n_steps=7)
    data = load_training_data(ten_images, config)
    plan = plan_memory(config, family_named("sd15").footprint, config.resolution, None, False)

    run, _ = resolve_run(config, plan, StableDiffusion15(), data, processes=1, eight_bit_available=False)
    default_run, _ = resolve_run(
        TrainingConfig(resolution=(64, 64)),
        plan,
        StableDiffusion15(),
        data,
        processes=1,
        eight_bit_available=False,
    )

    assert (run.checkpoint_every_steps, run.checkpoint_every_seconds) == (7, None)
    assert (default_run.checkpoint_every_steps, default_run.checkpoint_every_seconds) == (100, 600.0)
