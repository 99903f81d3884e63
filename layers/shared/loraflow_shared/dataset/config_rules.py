"""Rules between config keys: contradictions are INVALID_CONFIG, keys made moot are SETTING_ADJUSTED.

Each rule names every key involved, so the user knows which line of the TOML to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraflow_shared.dataset.config import TrainingConfig

# Previews render square at the shorter preview side. The renderer's VAE decode at 4096x4096 does not fit
# the default preview GPU (24 GB); the render-time budget (``preview_budget``) applies on top.
MAX_PREVIEW_SIDE = 2048


def conflicts(config: TrainingConfig) -> list[str]:
    """Messages for key combinations no trainer could honour (empty when consistent)."""
    return (
        _family_conflicts(config)
        + _bucket_conflicts(config)
        + _warmup_conflicts(config)
        + _output_conflicts(config)
        + _preview_conflicts(config)
    )


def moot_settings(config: TrainingConfig) -> list[tuple[str, str]]:
    """``(key, message)`` for keys that are valid but will not be used, as kohya would ignore them."""
    moot: list[tuple[str, str]] = []
    if config.clip_skip is not None and config.sdxl is True:
        moot.append(("clip_skip", "clip_skip: SD 1.x only; ignored for SDXL (sdxl = true), as kohya does"))
    if config.text_encoder_lr is not None and config.network_train_unet_only is True:
        moot.append(
            (
                "text_encoder_lr",
                "text_encoder_lr: ignored, the text encoder is not trained (network_train_unet_only = true)",
            )
        )
    return moot


def _family_conflicts(config: TrainingConfig) -> list[str]:
    """kohya's `sdxl` and loraflow's `model_family` must not name two families: `sdxl = true` only with an
    SDXL family, `sdxl = false` (kohya's "not SDXL") with any other (`model_family` then says which)."""
    from loraflow_shared.families import SDXL_KEY_CLAIMS  # imports this module's TrainingConfig

    family, sdxl = config.model_family, config.sdxl
    if family is None or sdxl is None or (family == SDXL_KEY_CLAIMS[True]) == sdxl:
        return []
    return [f'model_family: "{family}" contradicts sdxl = {str(sdxl).lower()}; set one of them, or neither']


def _bucket_conflicts(config: TrainingConfig) -> list[str]:
    low, high, step = config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps
    if low > high:
        return [f"min_bucket_reso: must be at most max_bucket_reso ({high}), got {low}"]
    if not config.enable_bucket:
        return []  # the other bucket keys only matter when bucketing is on (kohya checks them then too)
    problems = [
        f"{key}: must be a multiple of bucket_reso_steps ({step}) when enable_bucket = true, got {value}"
        for key, value in (("min_bucket_reso", low), ("max_bucket_reso", high))
        if value % step
    ]
    width, height = config.resolution
    if min(width, height) < low:
        problems.append(
            f"resolution: its shorter side must be at least min_bucket_reso ({low}) "
            f"when enable_bucket = true, got {width}x{height}"
        )
    if max(width, height) > high:
        problems.append(
            f"resolution: its longer side must be at most max_bucket_reso ({high}) "
            f"when enable_bucket = true, got {width}x{height}"
        )
    return problems


def _warmup_conflicts(config: TrainingConfig) -> list[str]:
    warmup = config.lr_warmup_steps
    if warmup and config.lr_scheduler == "constant":
        # kohya (and diffusers' get_scheduler) refuse warmup on the plain constant schedule.
        return [
            f'lr_warmup_steps: the "constant" lr_scheduler has no warmup; use lr_scheduler = '
            f'"constant_with_warmup" or set lr_warmup_steps = 0, got {warmup!r}'
        ]
    steps_known = config.max_train_epochs is None
    if isinstance(warmup, int) and steps_known and warmup > config.max_train_steps:
        return [f"lr_warmup_steps: must be at most max_train_steps ({config.max_train_steps}), got {warmup}"]
    return []


# The trainer writes the diffusers-format LoRA under this name: a kohya file named so would replace it.
DIFFUSERS_LORA_STEM = "pytorch_lora_weights"


def _output_conflicts(config: TrainingConfig) -> list[str]:
    if config.output_name.lower().removesuffix(".safetensors") == DIFFUSERS_LORA_STEM:
        return [
            f"output_name: '{config.output_name}' is reserved for the diffusers-format file"
            " loraflow also writes; choose another name"
        ]
    return []


def _preview_conflicts(config: TrainingConfig) -> list[str]:
    """Without ``preview_resolution`` previews take the training resolution, which may be too large."""
    if config.loraflow.preview_resolution is not None or config.preview_side <= MAX_PREVIEW_SIDE:
        return []
    width, height = config.resolution
    return [
        f"resolution: previews render at its shorter side unless [loraflow] preview_resolution is set, and "
        f"a preview side must be at most {MAX_PREVIEW_SIDE}; set loraflow.preview_resolution, "
        f"got {width}x{height}"
    ]
