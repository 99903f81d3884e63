"""Jobs that a stopped local cloud interrupted carry on when it starts again, as after a spot interruption.

Executions and training jobs do not survive a restart (moto keeps no state); the jobs table and the
checkpoints in S3 do. So each unfinished job's current attempt is started again under the same names:
its training job restores `checkpoints/<job_id>/` and resumes from the last checkpoint. A job whose
previews were rendering (the endpoint's queue is gone) ends that attempt FAILED and is retried as a new
attempt, which finds training already done in its checkpoint. VALIDATING jobs need nothing here: the
re-sent upload events (`reconcile`) validate them again.
"""

from __future__ import annotations

import logging

from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.control import JobControl
from loraflow_shared.jobs.model import Job, JobStatus
from loraflow_shared.jobs.repository import JobRepository

LOG = logging.getLogger(__name__)

INTERRUPTED_PREVIEWS = (
    "the local cloud stopped while the previews rendered; the job is retried as a new attempt, "
    "which resumes from the last checkpoint"
)


def resume_interrupted_jobs(repository: JobRepository, control: JobControl) -> list[Job]:
    """Start each unfinished job's work again; returns the jobs as they are afterwards."""
    resumed = []
    for job in repository.unfinished():
        if job.status in {JobStatus.QUEUED, JobStatus.TRAINING}:
            resumed.append(control.start_attempt(job))
        elif job.status is JobStatus.GENERATING_PREVIEWS:
            resumed.append(_retry_previews(repository, control, job))
        else:
            continue
        LOG.info("resumed job %s (attempt %d, was %s)", job.job_id, job.attempt, job.status.value)
    return resumed


def _retry_previews(repository: JobRepository, control: JobControl, job: Job) -> Job:
    repository.transition(
        job.job_id,
        JobStatus.FAILED,
        if_attempt=job.attempt,
        errors=[Problem(code=ErrorCode.PREVIEW_FAILED, path="", message=INTERRUPTED_PREVIEWS)],
        preview_task_token=None,
        attempts=job.attempts_ended(JobStatus.FAILED, repository.now()),
    )
    return control.retry(job.job_id)
