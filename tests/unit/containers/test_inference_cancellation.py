"""A cancelled job's previews stop rendering: before the render, between prompts and between steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from diffusion_kit import TrainingRun
from loraflow_diffusion.families import SupportedPipeline
from loraflow_diffusion.models import load_pipeline
from loraflow_inference.cancellation import POLL_INTERVAL_S, CancellationCheck, RenderCancelled
from loraflow_inference.handler import PreviewRenderer, render_prompts
from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.errors import ErrorCode

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

BUCKET = "artifacts"
LORA_KEY = "jobs/job-1/lora/pytorch_lora_weights.safetensors"
CANCEL_KEY = "async-inference/cancelled/job-1-1"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_given_marker_appears_when_polled_between_steps_then_at_most_every_interval() -> None:
    clock, polls = Clock(), []

    def exists(uri: str) -> bool:
        polls.append(clock.now)
        return clock.now >= 11

    check = CancellationCheck("job-1", "s3://b/k", exists=exists, clock=clock)
    for moment in (0, 1, 2, 6, 7, 10):
        clock.now = moment
        check.raise_if_cancelled(force=False)
    clock.now = 11
    with pytest.raises(RenderCancelled) as raised:
        check.raise_if_cancelled(force=False)

    assert polls == [0, 6, 11]  # never more often than POLL_INTERVAL_S
    assert POLL_INTERVAL_S == 5.0
    assert raised.value.code is ErrorCode.CANCELLED


def test_given_s3_unreachable_when_polled_then_the_render_goes_on() -> None:
    def exists(uri: str) -> bool:
        raise ConnectionError("no route")

    CancellationCheck("job-1", "s3://b/k", exists=exists).raise_if_cancelled()


def test_given_cancelled_mid_render_when_rendering_then_stops_at_the_next_step(
    tiny_model: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(str(tiny_model), device=torch.device("cpu"), dtype=torch.float32, cache_dir=tmp_path)
    steps_seen: list[int] = []
    clock = Clock()

    def exists(uri: str) -> bool:
        return len(steps_seen) >= 2  # the job is cancelled while the first prompt renders

    check = CancellationCheck("job-1", "s3://b/k", exists=exists, clock=clock)
    original = check.step_callback

    def counting(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps_seen.append(step)
        clock.now += POLL_INTERVAL_S  # each step takes long enough for a poll
        return original(pipe, step, timestep, kwargs)

    check.step_callback = counting  # type: ignore[method-assign]
    with pytest.raises(RenderCancelled):
        render_prompts(pipe, ["a", "b"], 10, 64, 0, cancellation=check)

    assert steps_seen == [0, 1]  # ten steps asked, two ran


def test_given_job_cancelled_before_its_turn_when_rendered_then_nothing_loaded_or_written(
    aws: None, training_run: TrainingRun, tmp_path: Path
) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(training_run.dirs.model / "pytorch_lora_weights.safetensors"), BUCKET, LORA_KEY)
    s3.put_object(Bucket=BUCKET, Key=CANCEL_KEY, Body=b"cancelled\n")
    loaded: list[str] = []

    def loader(ref: str) -> SupportedPipeline:
        loaded.append(ref)
        return load_pipeline(ref, device=torch.device("cpu"), dtype=torch.float32, cache_dir=tmp_path)

    request = PreviewRequest(
        job_id="job-1",
        base_model="s3://artifacts/base-models/never-loaded/",
        lora_s3_uri=f"s3://{BUCKET}/{LORA_KEY}",
        prompts=["a"],
        steps=2,
        resolution=64,
        seed=0,
        output_s3_prefix=f"s3://{BUCKET}/jobs/job-1/previews/",
        cancel_s3_uri=f"s3://{BUCKET}/{CANCEL_KEY}",
    )

    with pytest.raises(RenderCancelled):
        PreviewRenderer(loader).render(request)

    assert loaded == []
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="jobs/job-1/previews/")
