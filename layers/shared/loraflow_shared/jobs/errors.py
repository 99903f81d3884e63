"""Domain errors of the job lifecycle (codes from `loraflow_shared.errors`)."""

from __future__ import annotations

from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.jobs.model import JobStatus

ECHO_LIMIT = 64  # an id from a request is echoed at most this long: error bodies never grow with input


def echoed(value: str) -> str:
    """`value` as it may appear in a message: repr'd (control characters escaped) and bounded."""
    return repr(value if len(value) <= ECHO_LIMIT else value[:ECHO_LIMIT] + "…")


class JobNotFound(LoraflowError):
    def __init__(self, job_id: str) -> None:
        super().__init__(ErrorCode.JOB_NOT_FOUND, f"no job with id {echoed(job_id)}")
        self.job_id = job_id


class InvalidTransition(LoraflowError):
    """A status change the state rules forbid (e.g. a late step for a job that already failed)."""

    def __init__(self, job_id: str, current: JobStatus, target: JobStatus) -> None:
        super().__init__(
            ErrorCode.INTERNAL_ERROR,
            f"job {job_id} is {current.value}; it cannot move to {target.value}",
        )
        self.job_id = job_id
        self.current = current
        self.target = target


class StaleAttempt(LoraflowError):
    """A pipeline step of an attempt the job has moved on from (cancelled, then retried)."""

    def __init__(self, job_id: str, attempt: int, current: int) -> None:
        super().__init__(
            ErrorCode.INTERNAL_ERROR,
            f"job {job_id} runs attempt {current}; a step of attempt {attempt} must not change it",
        )
        self.job_id = job_id
        self.attempt = attempt
        self.current = current


class JobStateConflict(LoraflowError):
    """A request the job's status does not allow (HTTP 409): cancel an ended job, retry a running one."""

    def __init__(self, job_id: str, status: JobStatus, action: str, allowed: str) -> None:
        super().__init__(
            ErrorCode.JOB_STATE_CONFLICT,
            f"job {job_id} is {status.value}: only {allowed} jobs can be {action}",
        )
        self.job_id = job_id
        self.status = status


class GenerationNotFound(LoraflowError):
    def __init__(self, job_id: str, generation_id: str) -> None:
        super().__init__(
            ErrorCode.GENERATION_NOT_FOUND, f"job {job_id} has no generation with id {echoed(generation_id)}"
        )
        self.job_id = job_id
        self.generation_id = generation_id


class TooManyGenerations(LoraflowError):
    """A job has as many generations waiting as it may (HTTP 429): one more must wait for one to end."""

    def __init__(self, job_id: str, pending: int) -> None:
        super().__init__(
            ErrorCode.TOO_MANY_GENERATIONS,
            f"job {job_id} already has {pending} generations waiting to render (the most a job may have): "
            "ask again when one of them has finished",
        )
        self.job_id = job_id
        self.pending = pending
