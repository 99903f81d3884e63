"""Device and dtype choice: the one place that decides precision."""

from __future__ import annotations

import logging
from typing import Literal

import torch

MixedPrecision = Literal["no", "fp16", "bf16"]

logger = logging.getLogger(__name__)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(device: torch.device, mixed_precision: MixedPrecision) -> torch.dtype:
    """fp32 on CPU always (half precision there is slow and lossy); on CUDA what was asked, if supported."""
    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    if mixed_precision == "fp16":
        return torch.float16
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    logger.warning("bf16 asked but this GPU does not support it: using fp32")
    return torch.float32
