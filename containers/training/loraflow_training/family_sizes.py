"""Training sizes a model family can take: packed-latent DiTs need image sides that are multiples of 16
(VAE factor 8 times 2x2 patches), where SD's UNets take any multiple of 8.

A config written for SD (`resolution = 520`, `bucket_reso_steps = 8`) is moved to the nearest sizes the
family takes, and each change is reported (SETTING_ADJUSTED), rather than failing at the first packed step.
"""

from __future__ import annotations

import math

from loraflow_shared.dataset.config import TrainingConfig


def fit_sizes_to_family(config: TrainingConfig, multiple: int) -> tuple[TrainingConfig, list[str]]:
    """The config with `resolution` rounded down and `bucket_reso_steps` raised to `multiple`'s multiples;
    a message per change (none when the config's sizes already fit)."""
    updates: dict[str, object] = {}
    notes: list[str] = []
    width, height = config.resolution
    fitted = (max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))
    if fitted != config.resolution:
        updates["resolution"] = fitted
        notes.append(
            f"resolution: {width}x{height} became {fitted[0]}x{fitted[1]}, the model's image sides are"
            f" multiples of {multiple}"
        )
    if config.bucket_reso_steps % multiple:
        step = math.lcm(config.bucket_reso_steps, multiple)
        updates["bucket_reso_steps"] = step
        notes.append(
            f"bucket_reso_steps: {config.bucket_reso_steps} became {step}, the model's image sides are"
            f" multiples of {multiple}"
        )
    return config.model_copy(update=updates), notes
