"""The job record: one training run of one dataset version, and the rules about its states and names."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from loraflow_shared.dataset.objects import ObjectInfo
from loraflow_shared.errors import Problem


class JobStatus(StrEnum):
    VALIDATING = "VALIDATING"
    REJECTED = "REJECTED"
    QUEUED = "QUEUED"
    TRAINING = "TRAINING"
    GENERATING_PREVIEWS = "GENERATING_PREVIEWS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.REJECTED, JobStatus.COMPLETED, JobStatus.FAILED}
)

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING: frozenset({JobStatus.REJECTED, JobStatus.QUEUED}),
    JobStatus.QUEUED: frozenset({JobStatus.TRAINING, JobStatus.FAILED}),
    JobStatus.TRAINING: frozenset({JobStatus.GENERATING_PREVIEWS, JobStatus.FAILED}),
    JobStatus.GENERATING_PREVIEWS: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),
    JobStatus.REJECTED: frozenset(),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
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


class Artifacts(_Record):
    lora_diffusers_s3_uri: str
    training_report_s3_uri: str
    # `<output_name>.safetensors` in kohya/A1111/ComfyUI keys; None when the trainer wrote none.
    lora_kohya_s3_uri: str | None = None


class Preview(_Record):
    prompt: str
    s3_uri: str


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
    preview: PreviewSettings | None = None
    execution_arn: str | None = None
    training: TrainingSummary | None = None
    artifacts: Artifacts | None = None
    previews: list[Preview] = Field(default_factory=list)
    # Internal: the Step Functions task token the preview callback completes. Never exposed by the API.
    preview_task_token: str | None = None
    # Internal: set once the terminal notification went out, so a retried step re-sends a lost one.
    notified_at: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


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


def job_id_for(dataset: str, fingerprint: str) -> str:
    """Deterministic id of one dataset version: 24 lowercase hex chars.

    Valid as a Step Functions execution name and, prefixed by `loraflow-`, as a SageMaker
    TrainingJobName (`^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$`), so a re-delivered event maps to the same
    execution and the same training job.
    """
    return hashlib.sha256(f"{dataset}\n{fingerprint}".encode()).hexdigest()[:JOB_ID_LENGTH]


def training_job_name(job_id: str) -> str:
    return f"loraflow-{job_id}"


PROGRESS_FILENAME = "progress.json"


def checkpoint_prefix(job_id: str) -> str:
    """Key prefix (in the artifacts bucket) of the training job's `CheckpointConfig.S3Uri`.

    SageMaker mirrors the container's `/opt/ml/checkpoints` there during training and restores it
    after a spot interruption; the state machine builds the same URI from the job id.
    """
    return f"checkpoints/{training_job_name(job_id)}/"


def progress_key(job_id: str) -> str:
    """Where the trainer's `progress.json` lands while the job trains."""
    return checkpoint_prefix(job_id) + PROGRESS_FILENAME
