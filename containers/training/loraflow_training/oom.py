"""Out-of-memory: recognising it, and failing the job with OUT_OF_MEMORY and the memory plan tried.

PyTorch raises ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the same class) when its
caching allocator cannot get memory. Allocations outside that allocator fail as plain ``RuntimeError``s
(``torch.AcceleratorError: CUDA error: out of memory`` from a kernel launch, cuBLAS/cuDNN workspace
failures, the CPU allocator), which carry no other mark than their message: those messages are matched
below, and only on RuntimeErrors.

Recovering in-process is not attempted: after an OOM the job fails with the plan in its message. A
caller that must keep running (an evaluation after training, say) first lets the exception go (its
traceback holds the failed step's tensors), then calls ``release_device_memory()``
(``gc.collect()`` + ``torch.cuda.empty_cache()``) so that the cached blocks go back to the driver.
"""

from __future__ import annotations

import gc

import torch
from loraflow_shared.errors import ErrorCode, LoraflowError

from loraflow_training.memory_plan import MemoryPlan

_OOM_MESSAGES = (
    "CUDA out of memory",  # the caching allocator's text (older PyTorch raised it as RuntimeError)
    "CUDA error: out of memory",  # cudaErrorMemoryAllocation outside the allocator
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "MPS backend out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)
_MAX_DETAIL_CHARS = 200  # the failure file keeps 1 KiB: the plan and the advice come first


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc``, or an exception it was raised from, is a device or host out-of-memory error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError | MemoryError):
            return True
        if isinstance(current, RuntimeError) and any(text in str(current) for text in _OOM_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


def out_of_memory_error(plan: MemoryPlan, exc: BaseException) -> LoraflowError:
    """OUT_OF_MEMORY naming the plan that was tried, what to change, and PyTorch's first line."""
    where = "the CPU (host memory)" if plan.device_memory_bytes is None else "the GPU"
    lines = str(exc).strip().splitlines()
    detail = lines[0] if lines else type(exc).__name__
    if len(detail) > _MAX_DETAIL_CHARS:
        detail = detail[: _MAX_DETAIL_CHARS - 1] + "…"
    message = f"out of memory on {where} with memory plan {plan.describe()}. {_advice(plan)} ({detail})"
    return LoraflowError(ErrorCode.OUT_OF_MEMORY, message)


def release_device_memory() -> None:
    """Return PyTorch's cached, unused device memory to the driver (after the references are gone)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _advice(plan: MemoryPlan) -> str:
    """The config changes that lower memory, given what the plan already did."""
    changes = []
    if plan.batch_size > 1:
        changes.append("a smaller train_batch_size")
    if not plan.gradient_checkpointing:
        changes.append("gradient_checkpointing = true")
    if not plan.cache_latents:
        changes.append("cache_latents = true")
    if not plan.train_unet_only:
        changes.append("network_train_unet_only = true")
    if plan.optimizer == "AdamW":
        changes.append('optimizer_type = "AdamW8bit" (needs bitsandbytes)')
    if not plan.fp8_base:
        changes.append("fp8_base = true")
    changes.append("a lower resolution")
    bigger = "more host memory" if plan.device_memory_bytes is None else "more GPU memory"
    return f"Try {', '.join(changes)}, or an instance with {bigger}."
