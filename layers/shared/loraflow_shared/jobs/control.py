"""Job control: start an attempt, cancel a job, retry it. Shared by the ingest function (new versions,
superseding) and the jobs API (`cancel`, `retry`); the AWS calls are adapters passed in.

Order matters for cancel: the CANCELLED status is written first (a conditional write on the current
attempt), so any step of that attempt still in flight finds the job ended and changes nothing; it is
announced; then whatever still runs is stopped: the execution, its training jobs (Step Functions
would stop a `.sync` training job itself; stopping it directly frees the GPU even when the execution
already moved on) and a preview render (a marker the renderer polls: SageMaker cannot cancel an async
request). Each stop is attempted whatever happened to the others, and a failed one is logged at ERROR:
the job stays cancelled (its steps change nothing any more) and one stop failing rarely leaves a GPU
running, since stopping the execution also stops its training job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

from loraflow_shared.contracts import ExecutionInput
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem
from loraflow_shared.jobs.errors import InvalidTransition, JobStateConflict, StaleAttempt
from loraflow_shared.jobs.model import (
    RETRYABLE_STATUSES,
    Attempt,
    Job,
    JobStatus,
    execution_name,
    inference_id,
)
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import TerminalNotifier, announce_terminal

_MAY_RENDER = frozenset({JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS})
logger = logging.getLogger(__name__)


class Executions(Protocol):
    def start(self, execution_input: ExecutionInput) -> str:
        """Start the execution named `execution_name(job_id, attempt)`; an existing one counts as
        started. Returns its ARN."""
        ...

    def stop(self, execution_arn: str, cause: str) -> None:
        """Stop the execution; one that already ended is left as it is."""
        ...


class TrainingJobs(Protocol):
    def stop(self, name: str) -> None:
        """Stop the training job; one that does not exist or already ended is left as it is."""
        ...


class PreviewCancellations(Protocol):
    def cancel(self, inference: str) -> None:
        """Tell the renderer to stop the preview request `inference` (a marker it polls)."""
        ...


class Revalidation(Protocol):
    def request(self, job: Job) -> None:
        """Have the ingest function validate the job's dataset again (it failed before validation ended)."""
        ...


def cancelled_by_user() -> Problem:
    return Problem(code=ErrorCode.CANCELLED, path="", message="cancelled by request")


def superseded_by(newer: Job) -> Problem:
    message = f"superseded by job {newer.job_id}, a newer version of dataset {newer.dataset!r}"
    return Problem(code=ErrorCode.SUPERSEDED, path="", message=message)


def execution_input(job: Job) -> ExecutionInput:
    if job.config_file is None or job.base_model is None:
        raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"job {job.job_id} lacks its config file or base model")
    return ExecutionInput(
        job_id=job.job_id,
        attempt=job.attempt,
        dataset=job.dataset,
        dataset_s3_uri=job.dataset_s3_uri,
        config_file=job.config_file,
        base_model=job.base_model,
    )


class JobControl:
    def __init__(
        self,
        repository: JobRepository,
        notifier: TerminalNotifier,
        executions: Executions,
        training_jobs: TrainingJobs,
        previews: PreviewCancellations,
        revalidation: Revalidation | None = None,
    ) -> None:
        self._repository = repository
        self._notifier = notifier
        self._executions = executions
        self._training_jobs = training_jobs
        self._previews = previews
        self._revalidation = revalidation

    def new_attempt(self, job: Job, number: int) -> Attempt:
        return Attempt(
            number=number,
            execution_name=execution_name(job.job_id, number),
            started_at=self._repository.now(),
        )

    def start_attempt(self, job: Job) -> Job:
        """Start the execution of a QUEUED job's current attempt (idempotent) and record its ARN."""
        arn = self._executions.start(execution_input(job))
        attempt = job.current_attempt or self.new_attempt(job, job.attempt)
        if job.execution_arn == arn and attempt.execution_arn == arn:
            return job
        recorded = attempt.model_copy(update={"execution_arn": arn})
        return self._repository.update(
            job.job_id, if_attempt=job.attempt, execution_arn=arn, attempts=job.with_attempt(recorded)
        )

    def cancel(self, job_id: str, reason: Problem) -> Job:
        """End a job that has not ended as CANCELLED (409 `JOB_STATE_CONFLICT` for one that has)."""
        job = self._repository.require(job_id)
        if job.is_terminal:
            raise JobStateConflict(job_id, job.status, "cancelled", "unfinished")
        attempt = job.current_attempt
        try:
            cancelled = self._repository.transition(
                job_id,
                JobStatus.CANCELLED,
                if_attempt=job.attempt,
                errors=[reason],
                preview_task_token=None,
                attempts=job.attempts_ended(JobStatus.CANCELLED, self._repository.now()),
            )
        except (InvalidTransition, StaleAttempt) as exc:  # it ended (or was retried) meanwhile
            current = self._repository.require(job_id)
            raise JobStateConflict(job_id, current.status, "cancelled", "unfinished") from exc
        announced = announce_terminal(cancelled, self._repository, self._notifier)
        for what, stop in self._stops(job, attempt):
            try:
                stop()
            except Exception:
                logger.exception("job %s is cancelled, but stopping %s failed", job_id, what)
        return announced

    def _stops(self, job: Job, attempt: Attempt | None) -> list[tuple[str, Callable[[], None]]]:
        """What may still run for the job's attempt, each with the call that stops it."""
        stops: list[tuple[str, Callable[[], None]]] = []
        arn = (attempt.execution_arn if attempt else None) or job.execution_arn
        if arn is not None:
            stops.append((f"execution {arn}", lambda: self._executions.stop(arn, "loraflow job cancelled")))
        for name in attempt.training_job_names if attempt else []:
            stops.append((f"training job {name}", partial(self._training_jobs.stop, name)))
        if job.status in _MAY_RENDER:  # TRAINING too: it may have moved on to previews since it was read
            inference = inference_id(job.job_id, job.attempt)
            stops.append((f"preview render {inference}", lambda: self._previews.cancel(inference)))
        return stops

    def retry(self, job_id: str) -> Job:
        """Run a FAILED or CANCELLED job again from the same dataset version, as a new attempt."""
        job = self._repository.require(job_id)
        if job.status not in RETRYABLE_STATUSES:
            raise JobStateConflict(job_id, job.status, "retried", "FAILED or CANCELLED")
        validated = job.config_file is not None and job.base_model is not None
        number = job.attempt + 1
        try:
            restarted = self._repository.transition(
                job_id,
                JobStatus.QUEUED if validated else JobStatus.VALIDATING,
                if_attempt=job.attempt,
                from_statuses=RETRYABLE_STATUSES,
                **self._fresh_attempt_fields(job, number),
            )
        except (InvalidTransition, StaleAttempt) as exc:  # another retry won the race
            current = self._repository.require(job_id)
            raise JobStateConflict(job_id, current.status, "retried", "FAILED or CANCELLED") from exc
        if not validated:
            if self._revalidation is not None:
                self._revalidation.request(restarted)
            return restarted
        return self.start_attempt(restarted)

    def _fresh_attempt_fields(self, job: Job, number: int) -> dict[str, object]:
        """What a new attempt starts from: the dataset's own warnings, no outcome of the last attempt."""
        return {
            "attempt": number,
            "attempts": job.with_attempt(self.new_attempt(job, number)),
            "errors": [],
            "warnings": job.validation_warnings,
            "execution_arn": None,
            "training": None,
            "artifacts": None,
            "previews": [],
            "contact_sheet_s3_uri": None,
            "cost": None,
            "preview_task_token": None,
            "notified_at": None,
        }
