"""How much preview rendering one job may ask for: it must fit in one async-endpoint invocation.

The previews of a job are rendered by one ``InvokeEndpointAsync`` request, which SageMaker stops after
``PREVIEW_INVOCATION_TIMEOUT_S``. On a cold instance the base model is downloaded and loaded inside that
same invocation, so rendering gets what is left after ``MODEL_LOAD_ALLOWANCE_S``. Validation rejects a
config whose previews are estimated to take longer (``preview_budget_problem``), before any GPU time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from loraflow_shared.dataset.layout import Subset, default_preview_prompts
from loraflow_shared.errors import ErrorCode, Problem

if TYPE_CHECKING:
    from loraflow_shared.dataset.config import TrainingConfig

# The InvocationTimeoutSeconds loraflow sends with InvokeEndpointAsync (AWS allows at most 3600).
PREVIEW_INVOCATION_TIMEOUT_S = 1800
# Downloading (several GB from S3 or the Hub) and loading the base model on a cold instance happens
# inside the first invocation.
MODEL_LOAD_ALLOWANCE_S = 600
MAX_RENDER_SECONDS = PREVIEW_INVOCATION_TIMEOUT_S - MODEL_LOAD_ALLOWANCE_S
# Seconds per denoising step per megapixel on the default preview instance (ml.g5.xlarge: one NVIDIA A10G,
# fp16, an SDXL-class UNet with classifier-free guidance, i.e. two UNet passes per step). Public numbers
# put SDXL at 1024x1024 (1.05 MP) on an A10G at roughly 2-3 it/s with CFG, about 0.4 s per
# megapixel-step; 1.0 s is a ~2.5x margin, which also covers text encoding, the VAE decode and attention
# costing more than linearly at large sizes. SD 1.x is several times faster: it is over-estimated.
SECONDS_PER_MEGAPIXEL_STEP = 1.0
# Each prompt renders twice with the same seed: by the base model alone and with the LoRA (before/after).
RENDERS_PER_PROMPT = 2
_PIXELS_PER_MEGAPIXEL = 1_000_000


def estimated_render_seconds(
    prompts: int, steps: int, width: int, height: int, renders_per_prompt: int = RENDERS_PER_PROMPT
) -> float:
    """Estimated seconds to render ``prompts`` prompts (base and LoRA pictures: ``renders_per_prompt``) of
    ``width`` x ``height`` with ``steps`` steps each."""
    megapixels = width * height / _PIXELS_PER_MEGAPIXEL
    return prompts * renders_per_prompt * steps * megapixels * SECONDS_PER_MEGAPIXEL_STEP


def job_preview_prompts(config: TrainingConfig, subsets: Sequence[Subset]) -> list[str]:
    """The prompts a job renders: ``[loraflow] preview_prompts``, or defaults built from the subsets."""
    return config.loraflow.preview_prompts or default_preview_prompts(subsets)


def preview_budget_problem(config: TrainingConfig, subsets: Sequence[Subset], path: str) -> Problem | None:
    """One INVALID_CONFIG problem when the job's previews would not fit in ``MAX_RENDER_SECONDS``."""
    prompts = len(job_preview_prompts(config, subsets))
    steps = config.loraflow.preview_steps
    side = config.preview_side
    estimate = estimated_render_seconds(prompts, steps, side, side)
    if estimate <= MAX_RENDER_SECONDS:
        return None
    chosen = config.loraflow.preview_prompts
    which = "preview prompts" if chosen else "default preview prompts (from the subsets)"
    message = (
        f"[loraflow] previews: {prompts} {which} x {RENDERS_PER_PROMPT} pictures (base model, LoRA) x "
        f"{steps} steps at {side}x{side} are estimated at {estimate:.0f} s of rendering, the limit is "
        f"{MAX_RENDER_SECONDS} s (one "
        f"{PREVIEW_INVOCATION_TIMEOUT_S} s endpoint invocation less {MODEL_LOAD_ALLOWANCE_S} s to load the "
        "model): reduce preview_steps, preview_resolution or the number of preview_prompts"
    )
    return Problem(code=ErrorCode.INVALID_CONFIG, path=path, message=message)
