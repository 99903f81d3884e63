"""Optimizer and learning-rate schedule from the kohya config (kohya's names and defaults).

AdamW8bit needs bitsandbytes and CUDA; without them AdamW is used and the caller reports it as a
SETTING_ADJUSTED warning. Adafactor runs with a fixed learning rate (`relative_step=False`), as kohya's
LoRA guides configure it; the schedules are diffusers' `get_scheduler`, which kohya uses too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from loraflow_shared.dataset.config import Optimizer as OptimizerName
from loraflow_shared.dataset.config import TrainingConfig
from torch.optim.lr_scheduler import LRScheduler


@dataclass(frozen=True)
class ParamGroup:
    """Trainable parameters of one network part (the UNet's LoRA, a text encoder's LoRA) and its rate."""

    name: str
    params: list[torch.nn.Parameter]
    lr: float


def resolve_optimizer(
    requested: OptimizerName, *, eight_bit_available: bool
) -> tuple[OptimizerName, str | None]:
    """The optimizer that can run here, and a message when it is not the one requested."""
    if requested == "AdamW8bit" and not eight_bit_available:
        return (
            "AdamW",
            "optimizer_type: AdamW8bit needs CUDA and bitsandbytes, not available here; used AdamW",
        )
    return requested, None


def build_optimizer(name: OptimizerName, groups: Sequence[ParamGroup]) -> torch.optim.Optimizer:
    used = [group for group in groups if group.params]
    param_groups: list[dict[str, Any]] = [{"params": group.params, "lr": group.lr} for group in used]
    default_lr = used[0].lr
    if name == "AdamW8bit":
        import bitsandbytes  # only present on CUDA images; `resolve_optimizer` checked it

        optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW8bit(param_groups, lr=default_lr)
        return optimizer
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            param_groups, lr=default_lr, relative_step=False, scale_parameter=False, warmup_init=False
        )
    # fused: one kernel for the whole update of all LoRA tensors (CPU and CUDA). torch's default on CPU
    # is a per-tensor loop, and even foreach cost 2.4 ms per 100 small tensors against fused's 0.6 ms
    # (1 CPU thread): the largest non-denoiser cost of a step on the DiT families' hundreds of LoRA tensors.
    return torch.optim.AdamW(param_groups, lr=default_lr, fused=True)


def build_lr_scheduler(
    config: TrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> LRScheduler:
    """kohya's schedule: warmup in steps (or a fraction of `total_steps`), then `lr_scheduler`."""
    scheduler: LRScheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps(total_steps),
        num_training_steps=total_steps,
        num_cycles=config.lr_scheduler_num_cycles,
        power=config.lr_scheduler_power,
    )
    return scheduler
