"""Read models of the API: what a client sees of a job (internal fields stay internal)."""

from __future__ import annotations

from typing import Protocol

from loraflow_shared.errors import Problem
from loraflow_shared.jobs.model import Job, JobStatus, TrainingSummary
from loraflow_shared.jobs.repository import JobRepository
from pydantic import BaseModel, ConfigDict, Field

MAX_PAGE_SIZE = 100


class UrlSigner(Protocol):
    def presign(self, s3_uri: str) -> str:
        """A time-limited HTTPS GET URL for an S3 object."""
        ...


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class ArtifactLinks(_View):
    lora_diffusers_url: str
    training_report_url: str


class PreviewLink(_View):
    prompt: str
    url: str


class JobView(_View):
    job_id: str
    dataset: str
    status: JobStatus
    errors: list[Problem]
    warnings: list[Problem]
    created_at: str
    updated_at: str
    base_model: str | None
    training: TrainingSummary | None
    artifacts: ArtifactLinks | None
    previews: list[PreviewLink]


class JobPage(_View):
    items: list[JobView]
    next_token: str | None


class ListJobsQuery(BaseModel):
    """Query string of `GET /jobs`; unknown parameters are refused so a typo is not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(min_length=1)
    limit: int = Field(default=20, ge=1, le=MAX_PAGE_SIZE)
    next_token: str | None = Field(default=None, min_length=1)


def job_view(job: Job, signer: UrlSigner) -> JobView:
    artifacts = None
    if job.artifacts is not None:
        artifacts = ArtifactLinks(
            lora_diffusers_url=signer.presign(job.artifacts.lora_diffusers_s3_uri),
            training_report_url=signer.presign(job.artifacts.training_report_s3_uri),
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
        training=job.training,
        artifacts=artifacts,
        previews=[PreviewLink(prompt=p.prompt, url=signer.presign(p.s3_uri)) for p in job.previews],
    )


class JobQueries:
    def __init__(self, repository: JobRepository, signer: UrlSigner) -> None:
        self._repository = repository
        self._signer = signer

    def get_job(self, job_id: str) -> JobView:
        return job_view(self._repository.require(job_id), self._signer)

    def list_jobs(self, query: ListJobsQuery) -> JobPage:
        jobs, next_token = self._repository.list_by_dataset(query.dataset, query.limit, query.next_token)
        return JobPage(items=[job_view(job, self._signer) for job in jobs], next_token=next_token)
