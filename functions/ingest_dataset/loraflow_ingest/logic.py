"""Turn a settled dataset listing into exactly one job: claim it, validate it, reject it or queue it.

No boto3 here: the store and the execution starter are adapters passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from loraflow_shared.contracts import ExecutionInput
from loraflow_shared.dataset.layout import Subset, default_preview_prompts
from loraflow_shared.dataset.validate import (
    ObjectInfo,
    ObjectReader,
    ValidationLimits,
    ValidationReport,
    validate_dataset,
)
from loraflow_shared.jobs.model import Job, JobStatus, PreviewSettings, dataset_fingerprint, job_id_for
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import TerminalNotifier, announce_terminal
from loraflow_shared.s3 import s3_uri

from loraflow_ingest.events import DatasetRef


class DatasetStore(Protocol):
    def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]: ...

    def reader(self, bucket: str) -> ObjectReader: ...


class ExecutionStarter(Protocol):
    def start(self, execution_input: ExecutionInput) -> str:
        """Start the pipeline for a job (idempotent per job id); return the execution ARN."""
        ...


class Outcome(StrEnum):
    EMPTY = "EMPTY"  # nothing under the prefix (deleted)
    NOT_SETTLED = "NOT_SETTLED"  # still uploading: the newest object's own event comes later
    ALREADY_HANDLED = "ALREADY_HANDLED"  # a re-delivered event for a job past validation
    REJECTED = "REJECTED"
    QUEUED = "QUEUED"


class Ingestor:
    def __init__(
        self,
        repository: JobRepository,
        notifier: TerminalNotifier,
        store: DatasetStore,
        executions: ExecutionStarter,
        settle_seconds: int,
        default_base_model: str,
        limits: ValidationLimits | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repository = repository
        self._notifier = notifier
        self._store = store
        self._executions = executions
        self._settle = timedelta(seconds=settle_seconds)
        self._default_base_model = default_base_model
        self._limits = limits or ValidationLimits()
        self._clock = clock

    def ingest(self, ref: DatasetRef) -> tuple[Outcome, Job | None]:
        objects = self._store.list_objects(ref.bucket, f"{ref.dataset}/")
        if not objects:
            return Outcome.EMPTY, None
        if self._clock() - max(obj.last_modified for obj in objects) < self._settle:
            return Outcome.NOT_SETTLED, None
        job = self._claim(ref, objects)
        outcome = Outcome.ALREADY_HANDLED
        if job.status is JobStatus.VALIDATING:  # new, or a crash mid-validation: (re)validate
            job = self._validate(job, ref, objects)
            outcome = Outcome(job.status.value)
        if job.status is JobStatus.QUEUED:  # also after a crash between QUEUED and StartExecution
            job = self._start(job)
        announce_terminal(job, self._repository, self._notifier)
        return outcome, job

    def _claim(self, ref: DatasetRef, objects: Sequence[ObjectInfo]) -> Job:
        fingerprint = dataset_fingerprint(objects)
        now = self._repository.now()
        candidate = Job(
            job_id=job_id_for(ref.dataset, fingerprint),
            dataset=ref.dataset,
            status=JobStatus.VALIDATING,
            created_at=now,
            updated_at=now,
            fingerprint=fingerprint,
            dataset_s3_uri=s3_uri(ref.bucket, f"{ref.dataset}/"),
        )
        return self._repository.claim(candidate).job

    def _validate(self, job: Job, ref: DatasetRef, objects: Sequence[ObjectInfo]) -> Job:
        report = validate_dataset(ref.dataset, objects, self._store.reader(ref.bucket), self._limits)
        if not report.accepted or report.config is None or report.config_file is None:
            return self._repository.transition(
                job.job_id,
                JobStatus.REJECTED,
                errors=report.errors,
                warnings=report.warnings,
                config_file=report.config_file,
            )
        return self._repository.transition(
            job.job_id,
            JobStatus.QUEUED,
            warnings=report.warnings,
            config_file=report.config_file,
            base_model=report.config.pretrained_model_name_or_path or self._default_base_model,
            preview=preview_settings(report),
        )

    def _start(self, job: Job) -> Job:
        if job.config_file is None or job.base_model is None:
            raise ValueError(f"queued job {job.job_id} lacks its config file or base model")
        execution_arn = self._executions.start(
            ExecutionInput(
                job_id=job.job_id,
                dataset=job.dataset,
                dataset_s3_uri=job.dataset_s3_uri,
                config_file=job.config_file,
                base_model=job.base_model,
            )
        )
        if job.execution_arn == execution_arn:
            return job
        return self._repository.update(job.job_id, execution_arn=execution_arn)


def preview_settings(report: ValidationReport) -> PreviewSettings:
    """Preview prompts/steps/size/seed fixed at ingest, so later steps need not re-read the config."""
    if report.config is None:
        raise ValueError("an accepted dataset has a config")
    config = report.config
    subsets = [
        Subset(folder=s.folder, repeats=s.repeats, trigger=s.trigger, class_name=s.class_name)
        for s in report.subsets
    ]
    return PreviewSettings(
        prompts=config.loraflow.preview_prompts or default_preview_prompts(subsets),
        steps=config.loraflow.preview_steps,
        # Previews are square: the smaller side keeps them at the scale the LoRA was trained at.
        resolution=min(config.preview_size),
        seed=config.loraflow.preview_seed,
        clip_skip=config.clip_skip,
    )
