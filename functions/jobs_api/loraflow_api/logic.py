"""Read models of the API: what a client sees of a job (internal fields stay internal)."""

from __future__ import annotations

from typing import Any, Protocol

from aws_lambda_powertools import Logger
from loraflow_shared.base_models import BaseModelSource
from loraflow_shared.contracts import LossPoint, TrainingProgress
from loraflow_shared.errors import Problem
from loraflow_shared.families import ComputeClass
from loraflow_shared.jobs.control import JobControl, cancelled_by_user
from loraflow_shared.jobs.cost import total_cost
from loraflow_shared.jobs.errors import JobNotFound
from loraflow_shared.jobs.model import (
    Attempt,
    Cost,
    Job,
    JobStatus,
    Preview,
    StatusChange,
    TrainingSummary,
    is_job_id,
)
from loraflow_shared.jobs.repository import JobRepository
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from loraflow_api.generations import GenerationSummary, generation_summaries

MAX_PAGE_SIZE = 100

logger = Logger(child=True)


class UrlSigner(Protocol):
    def presign(self, s3_uri: str) -> str:
        """A time-limited HTTPS GET URL for an S3 object."""
        ...


class ProgressSource(Protocol):
    def read_progress(self, job_id: str) -> bytes | None:
        """The job's `progress.json` as written by the trainer; None when there is none (yet)."""
        ...


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class ArtifactLinks(_View):
    lora_diffusers_url: str
    training_report_url: str
    lora_kohya_url: str | None  # `<output_name>.safetensors` for A1111/ComfyUI/kohya; None for older jobs


class ProgressView(_View):
    """How far a training job has come (from the trainer's `progress.json`)."""

    step: int
    total_steps: int
    loss: float | None
    eta_seconds: float | None
    updated_at: str


class PreviewLink(_View):
    prompt: str
    url: str  # with the LoRA
    base_url: str | None  # the base model alone, same seed; None for jobs rendered before it


class JobView(_View):
    job_id: str
    dataset: str
    status: JobStatus
    errors: list[Problem]
    warnings: list[Problem]
    created_at: str
    updated_at: str
    base_model: str | None
    # A Hub base model's exact commit (pinned at upload) and the stack's copy it trained from, if any.
    base_model_source: BaseModelSource | None
    # The base model's family when known before training (null: the trainer tells it, in the report),
    # and the compute class it trains and renders on ("standard" or "large").
    model_family: str | None
    compute: ComputeClass
    training: TrainingSummary | None
    artifacts: ArtifactLinks | None
    previews: list[PreviewLink]
    contact_sheet_url: str | None  # one PNG: a row per prompt, base | LoRA
    # Pictures asked for with the job's LoRA (`POST /jobs/{job_id}/generations`), newest first.
    generations: list[GenerationSummary]
    # In `GET /jobs/{job_id}` and listings while TRAINING, once the trainer reported a step; else None.
    progress: ProgressView | None
    # Only in `GET /jobs/{job_id}` (None in listings): the loss so far while training, the final curve
    # after it (interval means, at most MAX_LOSS_CURVE_POINTS); [] before the first logged interval.
    loss_curve: list[LossPoint] | None
    # The timeline: each status the job moved to and when, oldest first ([] for jobs from before it).
    history: list[StatusChange]
    attempt: int
    # One per run of the pipeline: execution, training job name(s), capacity waits, outcome, cost.
    attempts: list[Attempt]
    cost: Cost | None  # the current attempt's training job
    total_estimated_usd: float | None  # every attempt's training jobs

    @field_serializer("training")
    def _training_without_curve(self, training: TrainingSummary | None) -> dict[str, Any] | None:
        """The curve is `loss_curve` (listings leave it out): not twice in one document."""
        return None if training is None else training.model_dump(mode="json", exclude={"loss_curve"})


class JobPage(_View):
    items: list[JobView]
    next_token: str | None


class ListJobsQuery(BaseModel):
    """Query string of `GET /jobs`; unknown parameters are refused so a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = Field(default=None, min_length=1)  # None: every dataset's jobs
    limit: int = Field(default=20, ge=1, le=MAX_PAGE_SIZE)
    next_token: str | None = Field(default=None, min_length=1)


def job_view(
    job: Job,
    signer: UrlSigner,
    progress: TrainingProgress | None = None,
    with_curve: bool = False,
) -> JobView:
    artifacts = None
    if job.artifacts is not None:
        kohya_uri = job.artifacts.lora_kohya_s3_uri
        artifacts = ArtifactLinks(
            lora_diffusers_url=signer.presign(job.artifacts.lora_diffusers_s3_uri),
            training_report_url=signer.presign(job.artifacts.training_report_s3_uri),
            lora_kohya_url=_presign_optional(kohya_uri, signer),
        )
    return JobView(
        job_id=job.job_id,
        dataset=job.dataset,
        status=job.status,
        errors=job.errors,
        warnings=job.warnings,
        created_at=job.created_at,
        updated_at=job.updated_at,
        base_model=job.base_model,
        base_model_source=job.base_model_source,
        model_family=job.model_family,
        compute=job.compute,
        training=job.training,
        artifacts=artifacts,
        previews=[_preview_link(preview, signer) for preview in job.previews],
        contact_sheet_url=_presign_optional(job.contact_sheet_s3_uri, signer),
        generations=generation_summaries(job),
        progress=None if progress is None else _progress_view(progress),
        loss_curve=_loss_curve(job, progress) if with_curve else None,
        history=_folded(job.history),
        attempt=job.attempt,
        attempts=job.attempts,
        cost=job.cost,
        total_estimated_usd=total_cost([attempt.cost for attempt in job.attempts] or [job.cost]),
    )


def _folded(history: list[StatusChange]) -> list[StatusChange]:
    """A retried step re-applies its status: only the first of such neighbours is a change."""
    return [change for i, change in enumerate(history) if i == 0 or history[i - 1].status != change.status]


def _preview_link(preview: Preview, signer: UrlSigner) -> PreviewLink:
    return PreviewLink(
        prompt=preview.prompt,
        url=signer.presign(preview.s3_uri),
        base_url=_presign_optional(preview.base_s3_uri, signer),
    )


def _presign_optional(uri: str | None, signer: UrlSigner) -> str | None:
    return signer.presign(uri) if uri is not None else None


def _loss_curve(job: Job, progress: TrainingProgress | None) -> list[LossPoint]:
    if job.training is not None:
        return job.training.loss_curve
    return [] if progress is None else progress.loss_curve


def parse_progress(job_id: str, raw: bytes) -> TrainingProgress | None:
    """A malformed file is the trainer's bug, not the caller's: it is logged and shown as no progress."""
    try:
        return TrainingProgress.model_validate_json(raw)
    except ValidationError as exc:
        logger.warning("ignoring malformed progress.json", job_id=job_id, reason=str(exc))
        return None


def _progress_view(progress: TrainingProgress) -> ProgressView:
    return ProgressView(
        step=progress.step,
        total_steps=progress.total_steps,
        loss=progress.loss,
        eta_seconds=progress.eta_seconds,
        updated_at=progress.updated_at,
    )


class JobQueries:
    def __init__(
        self, repository: JobRepository, signer: UrlSigner, progress: ProgressSource, control: JobControl
    ) -> None:
        self._repository = repository
        self._signer = signer
        self._progress = progress
        self._control = control

    def _require(self, job_id: str) -> Job:
        if not is_job_id(job_id):  # any other text is unknown: DynamoDB is not asked (nor can it fail)
            raise JobNotFound(job_id)
        return self._repository.require(job_id)

    def get_job(self, job_id: str) -> JobView:
        job = self._require(job_id)
        return job_view(job, self._signer, self._training_progress(job), with_curve=True)

    def cancel_job(self, job_id: str) -> JobView:
        """Stop whatever runs for the job and end it CANCELLED (409 once it has ended)."""
        self._require(job_id)
        return job_view(self._control.cancel(job_id, cancelled_by_user()), self._signer)

    def retry_job(self, job_id: str) -> JobView:
        """Run a FAILED or CANCELLED job again as a new attempt (409 otherwise)."""
        self._require(job_id)
        return job_view(self._control.retry(job_id), self._signer)

    def list_jobs(self, query: ListJobsQuery) -> JobPage:
        if query.dataset is None:
            jobs, next_token = self._repository.list_all(query.limit, query.next_token)
        else:
            jobs, next_token = self._repository.list_by_dataset(query.dataset, query.limit, query.next_token)
        items = [job_view(job, self._signer, self._training_progress(job)) for job in jobs]
        return JobPage(items=items, next_token=next_token)

    def _training_progress(self, job: Job) -> TrainingProgress | None:
        if job.status is not JobStatus.TRAINING:
            return None
        raw = self._progress.read_progress(job.job_id)
        return None if raw is None else parse_progress(job.job_id, raw)
