"""Device and dtype choice: the one place that decides precision and reads what the hardware offers."""

from __future__ import annotations

import importlib.util
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


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device; None on the CPU (no device memory to plan for)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def bitsandbytes_available() -> bool:
    """8-bit optimizers need the bitsandbytes package, and a CUDA device to run on."""
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def peak_device_memory_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))
