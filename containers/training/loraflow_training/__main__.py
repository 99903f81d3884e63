"""`python -m loraflow_training [train]`: SageMaker runs the image with `train`; exit 1 on any failure.

With several GPUs (or `LORAFLOW_NUM_PROCESSES`), this process starts one worker per device and waits;
each worker runs `run_training`, and only the main one writes the model dir, checkpoints and progress.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from loraflow_diffusion.device import bitsandbytes_available, device_memory_bytes, pick_dtype
from loraflow_diffusion.families import ModelFamily, SupportedPipeline, claimed_family, family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.sagemaker_env import TrainingPaths
from loraflow_shared.base_models import DATASET_CHANNEL
from loraflow_shared.dataset.config import ParsedConfig
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.hub_token import load_hub_token

from loraflow_training.base_model_source import base_model_to_load
from loraflow_training.checkpointing import CheckpointIdentity, CheckpointStore
from loraflow_training.data import TrainingData, load_training_data
from loraflow_training.distributed import (
    is_worker,
    launch_workers,
    make_accelerator,
    process_count,
    process_state,
)
from loraflow_training.failure import problem_for, write_failure
from loraflow_training.family_sizes import fit_sizes_to_family
from loraflow_training.memory_plan import MemoryPlan, plan_memory
from loraflow_training.network import target_modules
from loraflow_training.oom import is_out_of_memory, out_of_memory_error
from loraflow_training.progress import ProgressReporter
from loraflow_training.resolve import applied_config, resolve_run
from loraflow_training.settings import Hyperparameters, TrainerSettings, read_config
from loraflow_training.train import Persistence, RunSettings, TrainingOutcome, train_lora
from loraflow_training.wrapup import RunFacts, write_outputs

CHECKPOINT_SUBDIR = "state"
PROGRESS_FILE = "progress.json"

logger = logging.getLogger("loraflow_training")


@dataclass(frozen=True)
class PreparedRun:
    """Everything decided before the first step."""

    parsed: ParsedConfig
    data: TrainingData
    pipe: SupportedPipeline
    family: ModelFamily
    plan: MemoryPlan
    run: RunSettings
    adjusted: list[str]  # SETTING_ADJUSTED messages
    processes: int  # data-parallel processes


def run_training(
    paths: TrainingPaths, settings: TrainerSettings, stop: threading.Event | None = None
) -> TrainingOutcome:
    started, started_at = time.monotonic(), datetime.now(UTC)
    hyperparameters = Hyperparameters.from_paths(paths)
    prepared = prepare_run(paths, hyperparameters)
    config = prepared.parsed.config
    accelerator = make_accelerator(
        prepared.family.denoiser(prepared.pipe).dtype, config.gradient_accumulation_steps
    )
    persistence = _persistence(paths, settings, prepared, hyperparameters, accelerator.is_main_process)
    if stop is not None:
        persistence.stop = stop
    try:
        outcome = train_lora(
            prepared.pipe, prepared.family, prepared.data, config, prepared.run, accelerator, persistence
        )
        if accelerator.is_main_process:
            seconds = time.monotonic() - started  # to the last step: the effect check is not training
            facts = _facts(prepared, hyperparameters, outcome, started_at, seconds, accelerator.num_processes)
            write_outputs(paths.model_dir, prepared.pipe, prepared.family, facts)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(prepared.plan, exc) from exc
        raise
    return outcome


def _facts(
    prepared: PreparedRun,
    hyperparameters: Hyperparameters,
    outcome: TrainingOutcome,
    started_at: datetime,
    seconds: float,
    processes: int,
) -> RunFacts:
    return RunFacts(
        hyperparameters=hyperparameters,
        parsed=prepared.parsed,
        data=prepared.data,
        plan=prepared.plan,
        run=prepared.run,
        adjusted=[_adjusted(message, hyperparameters.config_file) for message in prepared.adjusted],
        outcome=outcome,
        started_at=started_at,
        seconds=seconds,
        processes=processes,
    )


def prepare_run(paths: TrainingPaths, hyperparameters: Hyperparameters) -> PreparedRun:
    """Config, data (every image decoded once: a broken one fails in seconds), model and plan."""
    parsed = read_config(paths.channel(DATASET_CHANNEL), hyperparameters.config_file)
    config = parsed.config
    data = load_training_data(paths.channel(DATASET_CHANNEL), config)
    state = process_state()
    logger.info(
        "%d images, %d samples per epoch, %d process(es)",
        len(data.samples),
        len(data.epoch_indices()),
        state.num_processes,
    )
    with state.main_process_first():  # one download into the shared model cache (and one mirror upload)
        reference, mirror_notes = base_model_to_load(
            paths,
            hyperparameters.base_model,
            hyperparameters.base_model_mirror if state.is_main_process else "",
            hyperparameters.job_id,
        )
        pipe = load_pipeline(
            reference,
            device=state.device,
            dtype=pick_dtype(state.device, config.mixed_precision),
            cache_dir=paths.model_cache_dir,
            expect_family=claimed_family(config.sdxl, config.model_family),
        )
    family = family_of(pipe)
    family.adopt_config(pipe, config)
    config, size_notes = fit_sizes_to_family(config, family.pixel_multiple)
    if size_notes:  # buckets again at sizes the family takes (decoding the images once more)
        parsed = parsed.model_copy(update={"config": config})
        data = load_training_data(paths.channel(DATASET_CHANNEL), config)
    eight_bit = bitsandbytes_available()
    largest = max((s.bucket for s in data.samples), key=lambda size: size[0] * size[1])
    plan = plan_memory(config, family.footprint, largest, device_memory_bytes(state.device), eight_bit)
    run, adjusted = resolve_run(
        config, plan, family, data, processes=state.num_processes, eight_bit_available=eight_bit
    )
    logger.info("memory plan: %s", plan.describe())
    notes = mirror_notes + size_notes + adjusted
    return PreparedRun(parsed, data, pipe, family, plan, run, notes, state.num_processes)


def _persistence(
    paths: TrainingPaths,
    settings: TrainerSettings,
    prepared: PreparedRun,
    hyperparameters: Hyperparameters,
    is_main: bool,
) -> Persistence:
    run = prepared.run
    targets = target_modules(prepared.family, prepared.parsed.config, run.train_text_encoder)
    # A checkpoint of another LoRA, base model or applied config is refused, never silently mixed in.
    identity = CheckpointIdentity.for_run(
        applied_config(prepared.parsed.config, run), hyperparameters.base_model, targets
    )
    progress = ProgressReporter(
        paths.checkpoint_dir / PROGRESS_FILE, run.total_steps, settings.loraflow_progress_interval_s
    )
    return Persistence(
        checkpoints=CheckpointStore(paths.checkpoint_dir / CHECKPOINT_SUBDIR, identity),
        progress=progress if is_main else None,
        progress_interval_s=settings.loraflow_progress_interval_s,
    )


def _adjusted(message: str, config_file: str) -> Problem:
    return Problem(code=ErrorCode.SETTING_ADJUSTED, path=config_file, message=message)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["train"]):
        print("usage: python -m loraflow_training [train]", file=sys.stderr)
        return 2
    paths = TrainingPaths.from_env()
    try:
        settings = TrainerSettings.from_environ()
        load_hub_token()  # gated base models; workers inherit HF_TOKEN
        processes = process_count(settings.loraflow_num_processes)
        if processes > 1 and not is_worker():
            return _supervise_workers(paths, processes, args)
        with _stop_on_sigterm() as stop:
            outcome = run_training(paths, settings, stop)
    except Exception as exc:
        logger.exception("training failed")  # the trace goes to the logs; the failure file gets one line
        # In a worker, the first failure is the cause; the others' (peers gone) must not replace it.
        write_failure(paths.failure_file, problem_for(exc), keep_existing=is_worker())
        return 1
    finally:
        if is_worker():
            _leave_process_group()
    logger.info("training done: %d steps, final loss %s", outcome.steps, outcome.final_loss)
    return 0


@contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """SageMaker stops a job (and a spot interruption ends it) with SIGTERM, then SIGKILL 120 s later:
    the loop checkpoints at its next sync point and stops, so a restarted job loses little."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.warning("SIGTERM: checkpointing at the next sync point, then stopping")
        stop.set()

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _supervise_workers(paths: TrainingPaths, processes: int, args: list[str]) -> int:
    logger.info("starting %d training processes", processes)
    status = launch_workers(processes, args)
    if status == 0:
        return 0
    if not paths.failure_file.exists():
        message = f"a training process exited with status {status} without a reason"
        write_failure(paths.failure_file, Problem(code=ErrorCode.TRAINING_FAILED, path="", message=message))
    return 1


def _leave_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
