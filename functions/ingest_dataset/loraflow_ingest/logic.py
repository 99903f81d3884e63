"""Turn a settled dataset listing into exactly one job: claim it, validate it, reject it or queue it.

The newest settled version of a dataset is the one that counts: claiming it cancels every unfinished
job of an older version (CANCELLED, reason SUPERSEDED), and a version that was itself superseded and
comes back (a user reverting a change) runs again as a new attempt. Every claimed job reaches a
terminal state: an unexpected error after the claim fails it (INTERNAL_ERROR, notified, logged)
instead of leaving it to SQS redeliveries.

No boto3 here: the store and job control's adapters are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

from aws_lambda_powertools import Logger
from loraflow_shared.dataset.layout import Subset
from loraflow_shared.dataset.preview_budget import job_preview_prompts
from loraflow_shared.dataset.validate import (
    ObjectInfo,
    ObjectReader,
    ValidationLimits,
    ValidationReport,
    validate_dataset,
)
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.compute import choose_compute
from loraflow_shared.jobs.control import JobControl, superseded_by
from loraflow_shared.jobs.errors import InvalidTransition, JobStateConflict, StaleAttempt
from loraflow_shared.jobs.model import Job, JobStatus, PreviewSettings, dataset_fingerprint, job_id_for
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import TerminalNotifier, announce_terminal
from loraflow_shared.s3 import s3_uri

from loraflow_ingest.events import DatasetRef
from loraflow_ingest.hub_lookup import HubResolver, look_up

logger = Logger(child=True)

# Unfinished jobs of one dataset are few (each new version cancels the older ones); this bounds the scan.
SUPERSEDE_SCAN_LIMIT = 100
REASON_LIMIT = 1000


class DatasetStore(Protocol):
    def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]: ...

    def reader(self, bucket: str) -> ObjectReader: ...

    def read_text(self, uri: str) -> str | None:
        """A small object's text (a base model's model_index.json), None when it cannot be read."""
        ...


class Outcome(StrEnum):
    EMPTY = "EMPTY"  # nothing under the prefix (deleted)
    NOT_SETTLED = "NOT_SETTLED"  # still uploading: the newest object's own event comes later
    ALREADY_HANDLED = "ALREADY_HANDLED"  # a re-delivered event for a job past validation
    REJECTED = "REJECTED"
    QUEUED = "QUEUED"
    FAILED = "FAILED"  # an unexpected error: the job failed with INTERNAL_ERROR


class Ingestor:
    def __init__(
        self,
        repository: JobRepository,
        notifier: TerminalNotifier,
        store: DatasetStore,
        control: JobControl,
        settle_seconds: int,
        default_base_model: str,
        hub: HubResolver,
        large_models: bool = True,
        limits: ValidationLimits | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repository = repository
        self._notifier = notifier
        self._store = store
        self._control = control
        self._settle = timedelta(seconds=settle_seconds)
        self._default_base_model = default_base_model
        self._hub = hub
        self._large_models = large_models
        self._limits = limits or ValidationLimits()
        self._clock = clock

    def ingest(self, ref: DatasetRef) -> tuple[Outcome, Job | None]:
        objects = self._store.list_objects(ref.bucket, f"{ref.dataset}/")
        if not objects:
            return Outcome.EMPTY, None
        if self._clock() - max(obj.last_modified for obj in objects) < self._settle:
            return Outcome.NOT_SETTLED, None
        job, created = self._claim(ref, objects)
        try:
            outcome, job = self._advance(job, created, ref, objects)
        except (InvalidTransition, StaleAttempt):  # cancelled (or retried) while we worked on it
            outcome, job = Outcome.ALREADY_HANDLED, self._repository.require(job.job_id)
        except Exception as exc:
            outcome, job = Outcome.FAILED, self._fail(job, exc)
        announce_terminal(job, self._repository, self._notifier)
        return outcome, job

    def _claim(self, ref: DatasetRef, objects: Sequence[ObjectInfo]) -> tuple[Job, bool]:
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
        claim = self._repository.claim(candidate)
        return claim.job, claim.created

    def _advance(
        self, job: Job, created: bool, ref: DatasetRef, objects: Sequence[ObjectInfo]
    ) -> tuple[Outcome, Job]:
        revived = _was_superseded(job)
        if created or revived:
            self._supersede_others(job)
        if revived:  # back to a version that a newer one had replaced: it counts again
            job = self._control.retry(job.job_id)
        outcome = Outcome.ALREADY_HANDLED
        if job.status is JobStatus.VALIDATING:  # new, or a crash mid-validation: (re)validate
            job = self._validate(job, ref, objects)
            outcome = Outcome(job.status.value)
        if job.status is JobStatus.QUEUED:  # also after a crash between QUEUED and StartExecution
            job = self._control.start_attempt(job)
        return outcome, job

    def _supersede_others(self, newer: Job) -> None:
        jobs, _ = self._repository.list_by_dataset(newer.dataset, limit=SUPERSEDE_SCAN_LIMIT)
        for older in jobs:
            if older.job_id == newer.job_id or older.is_terminal:
                continue
            try:
                self._control.cancel(older.job_id, superseded_by(newer))
            except JobStateConflict:
                continue  # it ended on its own meanwhile
            logger.info("superseded", job_id=older.job_id, newer_job_id=newer.job_id)

    def _validate(self, job: Job, ref: DatasetRef, objects: Sequence[ObjectInfo]) -> Job:
        report = validate_dataset(ref.dataset, objects, self._store.reader(ref.bucket), self._limits)
        if not report.accepted or report.config is None or report.config_file is None:
            return self._reject(job, report.errors, report)
        base_model = report.config.pretrained_model_name_or_path or self._default_base_model
        hub = look_up(base_model, self._hub)
        if hub.error is not None:
            return self._reject(job, [hub.error], report)
        choice = choose_compute(
            report.config, base_model, self._store.read_text, self._large_models, hub.model_index
        )
        if choice.error is not None:
            return self._reject(job, [choice.error], report)
        warnings = [*report.warnings, *hub.warnings, *choice.warnings]
        attempt = job.current_attempt or self._control.new_attempt(job, job.attempt)
        # Only from VALIDATING: a job cancelled meanwhile (CANCELLED may go to QUEUED on a retry) stays so.
        return self._repository.transition(
            job.job_id,
            JobStatus.QUEUED,
            from_statuses=[JobStatus.VALIDATING],
            if_attempt=job.attempt,
            warnings=warnings,
            validation_warnings=warnings,
            config_file=report.config_file,
            base_model=base_model,
            base_model_source=hub.source,
            model_family=choice.model_family,
            compute=choice.compute,
            preview=preview_settings(report),
            attempts=job.with_attempt(attempt),
        )

    def _reject(self, job: Job, errors: list[Problem], report: ValidationReport) -> Job:
        return self._repository.transition(
            job.job_id,
            JobStatus.REJECTED,
            from_statuses=[JobStatus.VALIDATING],
            if_attempt=job.attempt,
            errors=errors,
            warnings=report.warnings,
            config_file=report.config_file,
        )

    def _fail(self, job: Job, exc: Exception) -> Job:
        """End the claimed job FAILED with the reason; if even that fails, SQS redelivers (then the DLQ)."""
        logger.exception("ingest failed unexpectedly", job_id=job.job_id, dataset=job.dataset)
        reason = f"ingest failed unexpectedly: {type(exc).__name__}: {exc}"[:REASON_LIMIT]
        failed = self._repository.require(job.job_id)
        if failed.is_terminal:
            return failed
        return self._repository.transition(
            job.job_id,
            JobStatus.FAILED,
            if_attempt=failed.attempt,
            errors=[Problem(code=ErrorCode.INTERNAL_ERROR, path="", message=reason)],
            attempts=failed.attempts_ended(JobStatus.FAILED, self._repository.now()),
        )


def _was_superseded(job: Job) -> bool:
    return job.status is JobStatus.CANCELLED and any(p.code is ErrorCode.SUPERSEDED for p in job.errors)


def preview_settings(report: ValidationReport) -> PreviewSettings:
    """Preview prompts/steps/size/seed fixed at ingest, so later steps need not re-read the config.

    The same prompts and size that validation's preview budget counted (`preview_budget`)."""
    if report.config is None:
        raise ValueError("an accepted dataset has a config")
    config = report.config
    subsets = [
        Subset(folder=s.folder, repeats=s.repeats, trigger=s.trigger, class_name=s.class_name)
        for s in report.subsets
    ]
    return PreviewSettings(
        prompts=job_preview_prompts(config, subsets),
        steps=config.loraflow.preview_steps,
        resolution=config.preview_side,
        seed=config.loraflow.preview_seed,
        clip_skip=config.clip_skip,
    )
