"""Domain errors of the job lifecycle (codes from `loraflow_shared.errors`)."""

from __future__ import annotations

from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.jobs.model import JobStatus


class JobNotFound(LoraflowError):
    def __init__(self, job_id: str) -> None:
        super().__init__(ErrorCode.JOB_NOT_FOUND, f"no job with id {job_id!r}")
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
