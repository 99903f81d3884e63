"""Data-parallel training on every GPU of the instance (accelerate over torch.distributed).

`python -m loraflow_training train` starts as one process. With more than one GPU (or
`LORAFLOW_NUM_PROCESSES` > 1, which runs CPU processes over gloo) it re-runs itself under
`torch.distributed.run`, one worker per device; accelerate reads the workers' environment. Every
worker draws the same global batch and trains on its own rows of it, so N processes with batch B
follow the same loss curve as one process with batch N x B. Only rank 0 writes files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState

# Set by torch.distributed.run in every worker it starts.
WORKER_ENV = "LOCAL_RANK"


def process_count(requested: int | None) -> int:
    """Workers to run: the override when set, else one per CUDA device (at least one)."""
    if requested is not None:
        return requested
    return max(1, torch.cuda.device_count())


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def launch_workers(count: int, argv: Sequence[str]) -> int:
    """Run `count` workers of this entrypoint under torch.distributed.run; their exit status."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # one node: a local rendezvous on a free port
        f"--nproc_per_node={count}",
        "-m",
        "loraflow_training",
        *argv,
    ]
    workers = subprocess.Popen(command)
    # SageMaker stops a job (and a spot interruption ends it) with SIGTERM to this process: pass it on,
    # torch.distributed.run hands it to every worker, which checkpoints and stops.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: workers.send_signal(signal.SIGTERM))
    try:
        return workers.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def process_state() -> PartialState:
    """This process's rank, world size and device (initialises the process group in a worker)."""
    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(weight_dtype: torch.dtype, gradient_accumulation_steps: int) -> Accelerator:
    """An accelerator whose mixed precision matches the frozen weights' dtype (autocast, fp16 scaling)."""
    # accelerate keeps one precision per process; a process that trains twice (tests) must reset it.
    # The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=_mixed_precision(weight_dtype),
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        device_placement=False,  # the pipeline is placed already; the VAE/encoders may live elsewhere
    )


def _mixed_precision(weight_dtype: torch.dtype) -> str:
    if weight_dtype == torch.float16:
        return "fp16"
    if weight_dtype == torch.bfloat16:
        return "bf16"
    return "no"
