"""From the config, the memory plan and the hardware to how this run trains (`RunSettings`).

The memory plan decides the knobs the config leaves unpinned. What the hardware or the model family
cannot honour is adjusted here and reported as SETTING_ADJUSTED (the LoRA is delivered anyway).
"""

from __future__ import annotations

from typing import Protocol

from loraflow_diffusion.families import ModelFamily
from loraflow_shared.dataset.config import Optimizer as OptimizerName
from loraflow_shared.dataset.config import TrainingConfig

from loraflow_training.data import TrainingData
from loraflow_training.network import trains_convolutions
from loraflow_training.optim import resolve_optimizer
from loraflow_training.train import DEFAULT_CHECKPOINT_SECONDS, DEFAULT_CHECKPOINT_STEPS, RunSettings


class PlannedKnobs(Protocol):
    """The memory plan's decisions that shape the loop (`memory_plan.MemoryPlan` has them)."""

    @property
    def gradient_checkpointing(self) -> bool: ...
    @property
    def optimizer(self) -> OptimizerName: ...
    @property
    def cache_latents(self) -> bool: ...
    @property
    def train_unet_only(self) -> bool: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def fp8_base(self) -> bool: ...


def resolve_run(
    config: TrainingConfig,
    plan: PlannedKnobs,
    family: ModelFamily,
    data: TrainingData,
    *,
    processes: int,
    eight_bit_available: bool,
) -> tuple[RunSettings, list[str]]:
    """The run's settings, and a message for each setting that had to be adjusted."""
    adjusted: list[str] = []
    optimizer, optimizer_note = resolve_optimizer(plan.optimizer, eight_bit_available=eight_bit_available)
    if optimizer_note:
        adjusted.append(optimizer_note)
    clip_skip = config.clip_skip if family.supports_clip_skip else None
    adjusted += _ignored_for_family(config, family)
    batches_per_epoch = data.batches_per_epoch(plan.batch_size * processes)
    fixed_cadence = config.save_every_n_steps is not None
    return (
        RunSettings(
            batch_size=plan.batch_size,
            optimizer=optimizer,
            gradient_checkpointing=plan.gradient_checkpointing,
            cache_latents=plan.cache_latents,
            fp8_base=plan.fp8_base,
            # A family whose text encoders never train (LLM encoders) encodes captions once, not per step.
            train_text_encoder=not plan.train_unet_only and family.text_encoders_trainable,
            clip_skip=clip_skip,
            total_steps=config.total_steps(batches_per_epoch),
            checkpoint_every_steps=config.save_every_n_steps or DEFAULT_CHECKPOINT_STEPS,
            checkpoint_every_seconds=None if fixed_cadence else DEFAULT_CHECKPOINT_SECONDS,
        ),
        adjusted,
    )


def _ignored_for_family(config: TrainingConfig, family: ModelFamily) -> list[str]:
    """A message per key that is set but does not apply to the model's family."""
    notes = []
    for key in sorted(family.ignored_config_keys):
        if getattr(config, key) is None:
            continue
        if key == "clip_skip" and config.sdxl is not None:
            continue  # `sdxl = true` with clip_skip: validation reported it already
        notes.append(f"{key}: does not apply to {family.description}; ignored")
    if config.network_args.conv_dim is not None and not trains_convolutions(family, config):
        notes.append(f"network_args conv_dim: {family.description} has no convolutions to adapt; ignored")
    return notes


def applied_config(config: TrainingConfig, run: RunSettings) -> TrainingConfig:
    """The config with the plan's and the hardware's choices filled in: what actually runs."""
    return config.model_copy(
        update={
            "train_batch_size": run.batch_size,
            "optimizer_type": run.optimizer,
            "gradient_checkpointing": run.gradient_checkpointing,
            "fp8_base": run.fp8_base,
            "cache_latents": run.cache_latents,
            "network_train_unet_only": not run.train_text_encoder,
            "clip_skip": run.clip_skip,
            "max_train_steps": run.total_steps,
        }
    )
