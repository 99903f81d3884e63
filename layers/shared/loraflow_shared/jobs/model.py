"""The job record: one training run of one dataset version, and the rules about its states and names."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from loraflow_shared.base_models import BaseModelSource
from loraflow_shared.contracts import LossPoint
from loraflow_shared.dataset.objects import ObjectInfo
from loraflow_shared.errors import Problem
from loraflow_shared.families import DEFAULT_COMPUTE, ComputeClass


class JobStatus(StrEnum):
    VALIDATING = "VALIDATING"
    REJECTED = "REJECTED"
    QUEUED = "QUEUED"
    TRAINING = "TRAINING"
    GENERATING_PREVIEWS = "GENERATING_PREVIEWS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.REJECTED, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
)
# Terminal for an attempt, but a retry starts a new attempt from them.
RETRYABLE_STATUSES: frozenset[JobStatus] = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING: frozenset(
        {JobStatus.REJECTED, JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.QUEUED: frozenset({JobStatus.TRAINING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.TRAINING: frozenset({JobStatus.GENERATING_PREVIEWS, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.GENERATING_PREVIEWS: frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.REJECTED: frozenset(),
    JobStatus.COMPLETED: frozenset(),
    # A retry: back to QUEUED (validated before) or VALIDATING (failed before validation finished).
    JobStatus.FAILED: frozenset({JobStatus.QUEUED, JobStatus.VALIDATING}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED, JobStatus.VALIDATING}),
}
"""Status -> the statuses it may move to (architecture.md, "Job states")."""


def predecessors(status: JobStatus) -> frozenset[JobStatus]:
    """The statuses a job may be in for a transition to `status` to be allowed."""
    return frozenset(source for source, targets in ALLOWED_TRANSITIONS.items() if status in targets)


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PreviewSettings(_Record):
    """How previews are rendered, fixed at ingest from the dataset's config."""

    prompts: list[str]
    steps: int
    resolution: int
    seed: int
    # kohya's `clip_skip` (1 = last layer), so previews see the text features the LoRA was trained on.
    clip_skip: int | None = None


class TrainingSummary(_Record):
    job_name: str
    steps: int
    final_loss: float | None
    seconds: float
    # From the training report when the trainer wrote them (older jobs lack them).
    epochs: int | None = None
    peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None
    # The report's curve (interval means, at most MAX_LOSS_CURVE_POINTS: a few KB of the job's item).
    loss_curve: list[LossPoint] = Field(default_factory=list)


class Artifacts(_Record):
    lora_diffusers_s3_uri: str
    training_report_s3_uri: str
    # `<output_name>.safetensors` in kohya/A1111/ComfyUI keys; None when the trainer wrote none.
    lora_kohya_s3_uri: str | None = None


class Preview(_Record):
    prompt: str
    s3_uri: str  # with the LoRA
    base_s3_uri: str | None = None  # the base model alone, same seed (older jobs lack it)


class GenerationStatus(StrEnum):
    PENDING = "PENDING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class GenerationSettings(_Record):
    """How a generation renders: the request's values, the job's preview settings where it gave none."""

    steps: int
    resolution: int
    seed: int  # prompt i renders with seed + i, as previews
    lora_scale: float = 1.0
    negative_prompt: str | None = None
    guidance: float | None = None  # None: the family's own sampling default
    clip_skip: int | None = None  # the job's (SD 1.x): prompts encoded as the trainer encoded captions


class GeneratedImage(_Record):
    prompt: str
    s3_uri: str


class Generation(_Record):
    """Pictures rendered with a COMPLETED job's LoRA on request (`POST /jobs/{job_id}/generations`)."""

    generation_id: str
    status: GenerationStatus
    prompts: list[str]
    settings: GenerationSettings
    created_at: str
    updated_at: str
    images: list[GeneratedImage] = Field(default_factory=list)
    error: Problem | None = None  # why it FAILED


class Cost(_Record):
    """What a training job was billed for, as SageMaker reports it, and its estimated price."""

    instance_type: str
    instance_count: int
    training_seconds: int
    # SageMaker's BillableTimeInSeconds: below training_seconds with managed spot (its savings).
    billable_seconds: int
    spot: bool
    # From the stack's price table (a template parameter); None when the type is not in it.
    price_per_hour_usd: float | None = None
    estimated_usd: float | None = None


class Attempt(_Record):
    """One run of the pipeline for the job: its own execution and training job name(s)."""

    number: int
    execution_name: str
    started_at: str
    execution_arn: str | None = None
    # Every training job submitted in this attempt; more than one after capacity retries.
    training_job_names: list[str] = Field(default_factory=list)
    capacity_retries: int = 0
    # The reason of the last capacity retry (quota, spot capacity, throttling), shown while waiting.
    waiting_reason: str | None = None
    ended_at: str | None = None
    status: JobStatus | None = None
    cost: Cost | None = None


class StatusChange(_Record):
    """One entry of a job's timeline: the status it moved to, and when."""

    status: JobStatus
    at: str


class Job(_Record):
    job_id: str
    dataset: str
    status: JobStatus
    created_at: str
    updated_at: str
    fingerprint: str
    dataset_s3_uri: str
    errors: list[Problem] = Field(default_factory=list)
    warnings: list[Problem] = Field(default_factory=list)
    config_file: str | None = None
    base_model: str | None = None
    # A Hub base model's exact commit (resolved at ingest) and, once used, the stack's mirror of it.
    base_model_source: BaseModelSource | None = None
    # Decided at ingest (`jobs.compute`): the family when known before training, and the compute it gets.
    model_family: str | None = None
    compute: ComputeClass = DEFAULT_COMPUTE
    preview: PreviewSettings | None = None
    execution_arn: str | None = None
    training: TrainingSummary | None = None
    artifacts: Artifacts | None = None
    previews: list[Preview] = Field(default_factory=list)
    contact_sheet_s3_uri: str | None = None  # the previews' base | LoRA sheet, one PNG
    # Newest first, bounded (`jobs.generations`); changed only by read-modify-writes conditional on
    # `generations_revision`, which each such write increments.
    generations: list[Generation] = Field(default_factory=list)
    generations_revision: int = 0
    # The attempt now running (or last run); each retry adds one. Older records lack both: attempt 1.
    attempt: int = 1
    attempts: list[Attempt] = Field(default_factory=list)
    # Every transition, oldest first (a retried step that re-applies its status appends it again: readers
    # fold neighbours with the same status). Records from before it have none.
    history: list[StatusChange] = Field(default_factory=list)
    # Warnings of validation alone: a retry starts from them again (the trainer's are per attempt).
    validation_warnings: list[Problem] = Field(default_factory=list)
    cost: Cost | None = None
    # Internal: the Step Functions task token the preview callback completes. Never exposed by the API.
    preview_task_token: str | None = None
    # Internal: set once the terminal notification went out, so a retried step re-sends a lost one.
    notified_at: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def current_attempt(self) -> Attempt | None:
        return next((a for a in reversed(self.attempts) if a.number == self.attempt), None)

    def attempts_ended(self, status: JobStatus, at: str, cost: Cost | None = None) -> list[Attempt]:
        """`attempts` with the current one marked as ended in `status` at `at` (with its cost, if known)."""
        attempt = self.current_attempt
        if attempt is None:
            return self.attempts
        update: dict[str, object] = {"ended_at": at, "status": status}
        if cost is not None:
            update["cost"] = cost
        return self.with_attempt(attempt.model_copy(update=update))

    def with_attempt(self, attempt: Attempt) -> list[Attempt]:
        """`attempts` with `attempt` replacing the record of the same number (or appended)."""
        others = [a for a in self.attempts if a.number != attempt.number]
        return sorted([*others, attempt], key=lambda a: a.number)


def timestamp(moment: datetime | None = None) -> str:
    """ISO-8601 UTC with milliseconds and a `Z` suffix: sorts as text, which the GSI's range key needs."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dataset_fingerprint(objects: Iterable[ObjectInfo]) -> str:
    """sha256 over the sorted `(key, etag, size)` listing: any added, removed or changed object changes it."""
    digest = hashlib.sha256()
    for key, etag, size in sorted((obj.key, obj.etag, obj.size) for obj in objects):
        digest.update(f"{key}\0{etag}\0{size}\n".encode())
    return digest.hexdigest()


JOB_ID_LENGTH = 24
JOB_ID_PATTERN = re.compile(rf"^[0-9a-f]{{{JOB_ID_LENGTH}}}$")


def is_job_id(value: str) -> bool:
    """Whether `value` can be a job id at all (anything else is unknown without asking DynamoDB)."""
    return JOB_ID_PATTERN.fullmatch(value) is not None


def job_id_for(dataset: str, fingerprint: str) -> str:
    """Deterministic id of one dataset version: 24 lowercase hex chars.

    A re-delivered event maps to the same job. Executions and training jobs add the attempt (and
    submission) to it (`execution_name`, `training_job_name`), since AWS never reuses those names.
    """
    return hashlib.sha256(f"{dataset}\n{fingerprint}".encode()).hexdigest()[:JOB_ID_LENGTH]


TRAINING_JOB_PREFIX = "loraflow-"


def execution_name(job_id: str, attempt: int) -> str:
    """Each attempt has its own execution: Step Functions keeps names for 90 days."""
    return f"{job_id}-{attempt}"


def training_job_name(job_id: str, attempt: int, submission: int = 1) -> str:
    """Unique per submission: SageMaker training-job names can never be reused, even after a failure.

    `loraflow-<24 hex>-<attempt>-<submission>` stays within SageMaker's 63 characters.
    """
    return f"{TRAINING_JOB_PREFIX}{job_id}-{attempt}-{submission}"


PROGRESS_FILENAME = "progress.json"


def checkpoint_prefix(job_id: str) -> str:
    """Key prefix (in the artifacts bucket) of the training jobs' `CheckpointConfig.S3Uri`.

    One per job, shared by its attempts and capacity retries: SageMaker mirrors the container's
    `/opt/ml/checkpoints` there and restores it into each new training job, so a retry resumes from
    the last checkpoint as after a spot interruption. The state machine builds the same URI.
    """
    return f"checkpoints/{job_id}/"


def progress_key(job_id: str) -> str:
    """Where the trainer's `progress.json` lands while the job trains."""
    return checkpoint_prefix(job_id) + PROGRESS_FILENAME


ASYNC_INFERENCE_PREFIX = "async-inference/"


def inference_id(job_id: str, attempt: int) -> str:
    """The async endpoint's InferenceId for an attempt's previews: a late result of an earlier attempt
    can then never complete a later attempt's task."""
    return f"{job_id}-{attempt}"


def parse_inference_id(value: str) -> tuple[str, int] | None:
    """`(job_id, attempt)` of an `inference_id`; a bare job id (before attempts) is attempt 1."""
    job_id, _, attempt = value.partition("-")
    if not is_job_id(job_id) or (attempt and not attempt.isdigit()):
        return None
    return job_id, int(attempt or 1)


def preview_request_key(inference: str) -> str:
    return f"{ASYNC_INFERENCE_PREFIX}requests/{inference}.json"


def preview_cancel_key(inference: str) -> str:
    """Written when a job is cancelled while its previews render: the renderer polls for it and stops
    (SageMaker has no API to cancel an async request)."""
    return f"{ASYNC_INFERENCE_PREFIX}cancelled/{inference}"


def job_prefix(job_id: str) -> str:
    """Where a job's artifacts live in the artifacts bucket."""
    return f"jobs/{job_id}/"


def generation_prefix(job_id: str, generation_id: str) -> str:
    """A generation's pictures, named `contracts.preview_file(i)` under it."""
    return f"{job_prefix(job_id)}generations/{generation_id}/"


GENERATION_ID_LENGTH = 16
_GENERATION_ID_PATTERN = re.compile(rf"^[0-9a-f]{{{GENERATION_ID_LENGTH}}}$")
_GENERATION_MARK = "-g-"
# InvokeEndpointAsync's InferenceId: 1-64 printable characters (SageMaker Runtime API reference).
MAX_INFERENCE_ID_CHARS = 64


def new_generation_id() -> str:
    return secrets.token_hex(GENERATION_ID_LENGTH // 2)


def is_generation_id(value: str) -> bool:
    return _GENERATION_ID_PATTERN.fullmatch(value) is not None


def generation_inference_id(job_id: str, generation_id: str) -> str:
    """The async endpoint's InferenceId of a generation, `<job_id>-g-<generation_id>` (43 characters):
    `parse_inference_id` (previews) refuses it, `parse_generation_inference_id` only accepts it."""
    return f"{job_id}{_GENERATION_MARK}{generation_id}"


def parse_generation_inference_id(value: str) -> tuple[str, str] | None:
    """`(job_id, generation_id)` of a `generation_inference_id`; None for anything else."""
    job_id, mark, generation_id = value.partition(_GENERATION_MARK)
    if not mark or not is_job_id(job_id) or not is_generation_id(generation_id):
        return None
    return job_id, generation_id
