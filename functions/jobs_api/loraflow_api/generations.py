"""Generations through the API: `POST /jobs/{job_id}/generations` asks the job's preview endpoint for
pictures with its LoRA, `GET /jobs/{job_id}/generations/{generation_id}` tells how that went.

The generation is recorded PENDING on the job before the endpoint is asked, so the preview callback
always finds it; the callback records COMPLETED or FAILED (`loraflow_shared.jobs.generations`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem
from loraflow_shared.families import ComputeClass
from loraflow_shared.jobs.errors import GenerationNotFound, JobNotFound
from loraflow_shared.jobs.generations import (
    GenerationRequest,
    effective_status,
    ended,
    expired_problem,
    find_generation,
    generation_settings,
    pending_generation,
    render_request,
    require_generatable,
    with_new_generation,
    with_outcome,
)
from loraflow_shared.jobs.model import (
    Generation,
    GenerationSettings,
    GenerationStatus,
    Job,
    generation_inference_id,
    is_generation_id,
    is_job_id,
    new_generation_id,
    timestamp,
)
from loraflow_shared.jobs.repository import JobRepository
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from loraflow_api.logic import UrlSigner


UNSENT = LoraflowError(ErrorCode.INTERNAL_ERROR, "the render could not be asked of the preview endpoint")


class RenderSubmitter(Protocol):
    def submit(self, endpoint_name: str, request: PreviewRequest, inference: str) -> None:
        """Write the request JSON under `async-inference/requests/` and InvokeEndpointAsync it; a refusal
        raises LoraflowError (PREVIEW_FAILED)."""
        ...


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class GeneratedImageLink(_View):
    prompt: str
    url: str


class GenerationView(_View):
    generation_id: str
    job_id: str
    status: GenerationStatus
    prompts: list[str]
    settings: GenerationSettings  # what it renders with (the job's preview settings fill the gaps)
    created_at: str
    updated_at: str
    images: list[GeneratedImageLink]  # presigned, one per prompt; only when COMPLETED
    error: Problem | None  # only when FAILED


class GenerationSummary(_View):
    """A generation as the job's view lists it (newest first)."""

    generation_id: str
    status: GenerationStatus
    created_at: str


def generation_summaries(job: Job, now: datetime | None = None) -> list[GenerationSummary]:
    moment = now or datetime.now(UTC)
    return [
        GenerationSummary(
            generation_id=g.generation_id, status=effective_status(g, moment), created_at=g.created_at
        )
        for g in job.generations
    ]


def generation_view(job_id: str, generation: Generation, signer: UrlSigner, now: datetime) -> GenerationView:
    status = effective_status(generation, now)
    error = generation.error
    if status is GenerationStatus.FAILED and error is None:  # PENDING past its expiry
        error = expired_problem()
    images = (
        [GeneratedImageLink(prompt=i.prompt, url=signer.presign(i.s3_uri)) for i in generation.images]
        if status is GenerationStatus.COMPLETED
        else []
    )
    return GenerationView(
        generation_id=generation.generation_id,
        job_id=job_id,
        status=status,
        prompts=generation.prompts,
        settings=generation.settings,
        created_at=generation.created_at,
        updated_at=generation.updated_at,
        images=images,
        error=error,
    )


class Generations:
    def __init__(
        self,
        repository: JobRepository,
        submitter: RenderSubmitter,
        endpoints: Mapping[ComputeClass, str],
        artifacts_bucket: str,
        signer: UrlSigner,
        new_id: Callable[[], str] = new_generation_id,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repository = repository
        self._submitter = submitter
        self._endpoints = endpoints
        self._bucket = artifacts_bucket
        self._signer = signer
        self._new_id = new_id
        self._clock = clock

    def _require(self, job_id: str) -> Job:
        if not is_job_id(job_id):  # any other text is unknown: DynamoDB is not asked
            raise JobNotFound(job_id)
        return self._repository.require(job_id)

    def create(self, job_id: str, body: str | None) -> GenerationView:
        """404 unknown job, 400 a bad body, 409 a job that is not COMPLETED, 429 too many waiting."""
        job = self._require(job_id)
        request = GenerationRequest.from_body(body)
        require_generatable(job)
        settings = generation_settings(job, request)
        endpoint = self._endpoints.get(job.compute)
        if endpoint is None:
            raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"this stack has no {job.compute} preview endpoint")
        now = self._clock()
        generation = pending_generation(self._new_id(), request, settings, now)
        recorded = self._repository.change_generations(
            job_id, lambda current: with_new_generation(current, generation, now)
        )
        if recorded is None:  # `with_new_generation` always writes: only a bug lands here
            raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"generation of job {job_id} not recorded")
        inference = generation_inference_id(job_id, generation.generation_id)
        try:
            self._submitter.submit(endpoint, render_request(recorded, generation, self._bucket), inference)
        except Exception as exc:  # any refusal: the generation ends FAILED, never left PENDING
            problem = (exc if isinstance(exc, LoraflowError) else UNSENT).to_problem()
            at = timestamp(self._clock())
            failed = ended(generation, at, status=GenerationStatus.FAILED, error=problem)
            self._repository.change_generations(job_id, lambda current: with_outcome(current, failed))
            raise
        return generation_view(job_id, generation, self._signer, now)

    def get(self, job_id: str, generation_id: str) -> GenerationView:
        job = self._require(job_id)
        generation = find_generation(job, generation_id) if is_generation_id(generation_id) else None
        if generation is None:
            raise GenerationNotFound(job_id, generation_id)
        return generation_view(job_id, generation, self._signer, self._clock())
