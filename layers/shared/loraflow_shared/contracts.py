"""Payloads that cross a process boundary: state machine input, preview request/response, training report.

The Lambda functions, the training container and the inference container all import these models,
so a payload is described once. Requests forbid unknown keys (a typo is an error, not a silent
default); the training report allows extra keys because the trainer may add metrics over time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from loraflow_shared.errors import Problem

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

S3Uri = Annotated[str, StringConstraints(pattern=r"^s3://[^/]+/.*$")]
"""An ``s3://bucket/key`` URI (the key may be empty or a prefix)."""

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExecutionInput(_Strict):
    """Input of the training pipeline state machine, one execution per attempt (`execution_name`)."""

    job_id: NonEmptyStr
    attempt: int = Field(ge=1)
    dataset: NonEmptyStr
    dataset_s3_uri: S3Uri
    config_file: NonEmptyStr
    base_model: NonEmptyStr


class PreviewRequest(_Strict):
    """Async inference request, written to `async-inference/requests/<job_id>.json`."""

    job_id: NonEmptyStr
    base_model: NonEmptyStr
    # The `pytorch_lora_weights.safetensors` object itself (diffusers format), not its folder.
    lora_s3_uri: S3Uri
    prompts: list[NonEmptyStr] = Field(min_length=1)
    steps: int = Field(ge=1)
    # Stable Diffusion's VAE downsamples by 8: other sizes cannot be rendered.
    resolution: int = Field(ge=8, multiple_of=8)
    seed: int = Field(ge=0)
    # kohya's sense (1 = the last CLIP layer); applied to SD 1.x only, as in training.
    clip_skip: int | None = Field(default=None, ge=1)
    # Where the endpoint writes its pictures (`preview_file`, `base_preview_file`, `CONTACT_SHEET_FILE`),
    # e.g. `s3://artifacts/jobs/<job_id>/previews/`.
    output_s3_prefix: S3Uri
    # An object that appears when the job is cancelled: the renderer polls it and stops rendering.
    cancel_s3_uri: S3Uri | None = None
    # Previews render each prompt by the base model alone too, and a contact sheet of the pairs; a
    # generation (`POST /jobs/{job_id}/generations`) renders with the LoRA only.
    render_base: bool = True
    # The LoRA's weight (1: as trained; 0: the base model's picture; negative: its effect inverted).
    lora_scale: FiniteFloat = 1.0
    negative_prompt: str | None = None
    # Classifier-free guidance (or the embedded guidance of guidance-distilled models) in the pipeline's
    # own sense; None: the family's sampling default.
    guidance: FiniteFloat | None = Field(default=None, ge=0)


class PreviewResult(_Strict):
    prompt: str
    s3_uri: S3Uri  # with the LoRA
    base_s3_uri: S3Uri | None = None  # the base model alone, same seed (None from renderers before it)


class PreviewResponse(_Strict):
    """Async inference output (the JSON object at the response's `outputLocation`)."""

    job_id: NonEmptyStr
    previews: list[PreviewResult]
    # One PNG: a row per prompt, the base's picture beside the LoRA's.
    contact_sheet_s3_uri: S3Uri | None = None


CONTACT_SHEET_FILE = "contact-sheet.png"


def preview_file(index: int) -> str:
    """The name of prompt `index`'s picture with the LoRA, under the request's `output_s3_prefix`."""
    return f"{index}.png"


def base_preview_file(index: int) -> str:
    """The name of prompt `index`'s picture by the base model alone (same seed)."""
    return f"base-{index}.png"


MAX_LOSS_CURVE_POINTS = 200  # a 100k-step run logs 10k interval means: merged down to this many


class LossPoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: int = Field(ge=0)  # the last step of the interval
    loss: FiniteFloat  # mean loss over the interval


def merge_loss_curve(
    points: Sequence[tuple[int, float]], limit: int = MAX_LOSS_CURVE_POINTS
) -> list[LossPoint]:
    """Merge runs of neighbouring intervals so at most `limit` remain, each mean weighted by its steps.

    `points`: (last step of the interval, mean loss over it), in step order."""
    group = max(1, -(-len(points) // limit))  # ceil
    merged: list[LossPoint] = []
    previous_end = 0
    for start in range(0, len(points), group):
        chunk = points[start : start + group]
        weighted = total = 0.0
        for end, loss in chunk:
            weighted += loss * (end - previous_end)
            total += end - previous_end
            previous_end = end
        merged.append(LossPoint(step=chunk[-1][0], loss=weighted / total if total else chunk[-1][1]))
    return merged


class LossSummary(BaseModel):
    """The loss curve as logged: means over logging intervals (the loop syncs with the device only then)."""

    model_config = ConfigDict(frozen=True)

    first: FiniteFloat
    last: FiniteFloat
    min: FiniteFloat
    min_step: int
    curve: list[LossPoint]  # interval means, at most MAX_LOSS_CURVE_POINTS (neighbours merged)

    @classmethod
    def from_interval_means(cls, points: Sequence[tuple[int, float]]) -> LossSummary | None:
        """`points`: (last step of the interval, mean loss over it), in step order; None when empty."""
        if not points:
            return None
        lowest = min(points, key=lambda point: point[1])
        return cls(
            first=points[0][1],
            last=points[-1][1],
            min=lowest[1],
            min_step=lowest[0],
            curve=merge_loss_curve(points),
        )


class TrainingReport(BaseModel):
    """`training_report.json` written by the trainer next to the LoRA weights."""

    model_config = ConfigDict(extra="allow", frozen=True)

    steps: int = Field(ge=0)
    # None when no step ran; NaN/inf are refused (a diverged run is a failure, not a report).
    final_loss: FiniteFloat | None
    seconds: float = Field(ge=0)
    ignored_keys: list[str] = Field(default_factory=list)
    # Warnings about the delivered LoRA (WEAK_LORA, SETTING_ADJUSTED); the job's warnings gain them.
    warnings: list[Problem] = Field(default_factory=list)
    # `<output_name>.safetensors` is the kohya-format copy of the LoRA beside the diffusers file.
    output_name: str | None = None
    epochs: int | None = Field(default=None, ge=0)
    # Peak memory of the run in MiB (process RSS; CUDA allocator), when measured.
    peak_rss_mb: float | None = Field(default=None, ge=0)
    peak_cuda_mb: float | None = Field(default=None, ge=0)
    loss: LossSummary | None = None  # older trainers wrote none

    @field_validator("warnings")
    @classmethod
    def _only_warning_codes(cls, warnings: list[Problem]) -> list[Problem]:
        failures = sorted({problem.code.value for problem in warnings if not problem.is_warning})
        if failures:
            raise ValueError(f"{', '.join(failures)} are failure codes, not warnings")
        return warnings


class TrainingProgress(BaseModel):
    """`progress.json`, rewritten by the trainer in its checkpoint folder while it trains.

    SageMaker copies that folder to `CheckpointConfig.S3Uri` during the run, which is how the API
    reads it (`loraflow_shared.jobs.model.progress_key`). Unknown keys are ignored.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    loss: FiniteFloat | None = None
    eta_seconds: float | None = Field(default=None, ge=0)
    steps_per_second: float | None = Field(default=None, ge=0)
    updated_at: str = Field(min_length=1)  # ISO-8601 UTC
    # The loss so far: interval means, at most MAX_LOSS_CURVE_POINTS (older trainers wrote none).
    loss_curve: list[LossPoint] = Field(default_factory=list)
