"""Generations: pictures rendered on request with a COMPLETED job's LoRA, on the job's preview endpoint.

The endpoint is one FIFO queue shared with the previews of jobs that are finishing training, so a
generation's work is bounded twice: each one fits the preview budget (`dataset.preview_budget`, LoRA
pictures only) and a job has at most `MAX_PENDING_GENERATIONS` waiting at a time. A training job's
preview request therefore waits behind at most that many bounded renders per job that generates
(docs/architecture.md, "Generations").

A job keeps its newest generations on its own item (`Job.generations`), at most
`MAX_STORED_GENERATIONS` and `MAX_STORED_GENERATIONS_BYTES` of them, far below DynamoDB's 400 KB item
limit; older records are dropped (their pictures stay in S3).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_jsonable_python

from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.dataset.config import (
    GuidanceScale,
    PreviewPrompts,
    PreviewSide,
    PreviewSteps,
    Prompt,
    Seed,
)
from loraflow_shared.dataset.config_messages import describe_errors
from loraflow_shared.dataset.preview_budget import (
    MAX_RENDER_SECONDS,
    estimated_render_seconds,
)
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem
from loraflow_shared.families import facts_named
from loraflow_shared.jobs.errors import JobStateConflict, TooManyGenerations
from loraflow_shared.jobs.model import (
    Generation,
    GenerationSettings,
    GenerationStatus,
    Job,
    JobStatus,
    generation_prefix,
    timestamp,
)
from loraflow_shared.jobs.preview_timing import GENERATION_EXPIRY_S
from loraflow_shared.s3 import s3_uri

# At most this many PENDING generations per job: with previews, one render at a time per instance.
MAX_PENDING_GENERATIONS = 2
MAX_STORED_GENERATIONS = 50
# A generation's record is a few hundred bytes; at its largest (8 prompts of 1000 four-byte characters
# and a negative prompt) about 38 KB: two of them always fit, so no PENDING one is ever dropped.
MAX_STORED_GENERATIONS_BYTES = 100_000
MAX_ERROR_CHARS = 2000  # an endpoint's failure reason, as stored
# A generation renders each prompt once, with the LoRA (previews render the base model's too).
RENDERS_PER_GENERATED_PROMPT = 1
# The LoRA's weight: 1 as trained, 0 the base model alone, negative inverts its effect (A1111's
# `<lora:name:-1>`); past 2 pictures only fall apart.
LoraScale = Annotated[float, Field(ge=-2, le=2)]


class GenerationRequest(BaseModel):
    """The body of `POST /jobs/{job_id}/generations`, bounded as the `[loraflow]` preview settings are;
    unknown keys are refused. A value left out takes the job's preview setting."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, str_strip_whitespace=True)

    prompts: PreviewPrompts
    steps: PreviewSteps | None = None
    seed: Seed | None = None
    lora_scale: LoraScale = 1.0
    resolution: PreviewSide | None = None  # the side of the square pictures
    negative_prompt: Prompt | None = None
    guidance: GuidanceScale | None = None

    @classmethod
    def from_body(cls, body: str | None) -> GenerationRequest:
        """The request in an HTTP body; anything else is the caller's error (BAD_REQUEST, every problem)."""
        try:
            document = json.loads(body or "")
        except ValueError as exc:
            raise LoraflowError(ErrorCode.BAD_REQUEST, f"the body is not JSON: {exc}") from exc
        if not isinstance(document, dict):
            keys = ", ".join(cls.model_fields)
            raise LoraflowError(ErrorCode.BAD_REQUEST, f"the body must be a JSON object with keys {keys}")
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            message = "; ".join(describe_errors(cls, exc.errors(include_url=False)))
            raise LoraflowError(ErrorCode.BAD_REQUEST, message) from exc


def generation_settings(job: Job, request: GenerationRequest) -> GenerationSettings:
    """The request's settings, the job's preview settings where it gave none; within the preview budget."""
    preview = job.preview
    if preview is None:
        raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"job {job.job_id} has no preview settings")
    if request.negative_prompt is not None:
        _require_negative_prompts(job)
    settings = GenerationSettings(
        steps=request.steps if request.steps is not None else preview.steps,
        resolution=request.resolution if request.resolution is not None else preview.resolution,
        seed=request.seed if request.seed is not None else preview.seed,
        lora_scale=request.lora_scale,
        negative_prompt=request.negative_prompt,
        guidance=request.guidance,
        clip_skip=preview.clip_skip,
    )
    side = settings.resolution
    estimate = estimated_render_seconds(
        len(request.prompts), settings.steps, side, side, renders_per_prompt=RENDERS_PER_GENERATED_PROMPT
    )
    if estimate > MAX_RENDER_SECONDS:
        raise LoraflowError(
            ErrorCode.BAD_REQUEST,
            f"{len(request.prompts)} prompts x {settings.steps} steps at {side}x{side} are estimated at "
            f"{estimate:.0f} s of rendering, the limit is {MAX_RENDER_SECONDS} s: fewer prompts, steps or "
            "a smaller resolution",
        )
    return settings


def _require_negative_prompts(job: Job) -> None:
    """A family whose pipeline takes no negative prompt refuses one (400) before anything renders."""
    family = facts_named(job.model_family) if job.model_family else None
    if family is not None and not family.takes_negative_prompt:
        raise LoraflowError(
            ErrorCode.BAD_REQUEST,
            f"{family.label} takes no negative_prompt (its pipeline has none): leave it out",
        )


def require_generatable(job: Job) -> None:
    """Only a COMPLETED job has a LoRA that its endpoint has rendered with (409 otherwise)."""
    if job.status is not JobStatus.COMPLETED or job.artifacts is None:
        raise JobStateConflict(job.job_id, job.status, "used to generate", "COMPLETED")


def effective_status(generation: Generation, now: datetime) -> GenerationStatus:
    """PENDING past `GENERATION_EXPIRY_S` can no longer succeed (its request expired, or its result was
    lost): FAILED, and no longer counted against the job's pending ones."""
    if generation.status is GenerationStatus.PENDING and _age(generation, now) > GENERATION_EXPIRY_S:
        return GenerationStatus.FAILED
    return generation.status


def expired_problem() -> Problem:
    return Problem(
        code=ErrorCode.PREVIEW_FAILED,
        path="",
        message=f"no result from the endpoint within {GENERATION_EXPIRY_S} s",
    )


def _age(generation: Generation, now: datetime) -> float:
    return (now - datetime.fromisoformat(generation.created_at)).total_seconds()


def with_new_generation(job: Job, generation: Generation, now: datetime) -> list[Generation]:
    """The job's generations with `generation` first; refused while the job has its fill waiting."""
    require_generatable(job)
    pending = sum(effective_status(g, now) is GenerationStatus.PENDING for g in job.generations)
    if pending >= MAX_PENDING_GENERATIONS:
        raise TooManyGenerations(job.job_id, pending)
    return bounded([generation, *job.generations])


def bounded(generations: list[Generation]) -> list[Generation]:
    """The newest generations (first) that fit `MAX_STORED_GENERATIONS` and `MAX_STORED_GENERATIONS_BYTES`;
    the newest is always kept."""
    kept: list[Generation] = []
    size = 0
    for generation in generations[:MAX_STORED_GENERATIONS]:
        size += _stored_bytes(generation)
        if kept and size > MAX_STORED_GENERATIONS_BYTES:
            break
        kept.append(generation)
    return kept


def _stored_bytes(generation: Generation) -> int:
    """About what DynamoDB counts for the record: its JSON in UTF-8 (names and values)."""
    return len(json.dumps(to_jsonable_python(generation), ensure_ascii=False).encode())


def with_outcome(job: Job, outcome: Generation) -> list[Generation] | None:
    """The job's generations with `outcome` (COMPLETED or FAILED) replacing its PENDING record; None when
    there is nothing to change: unknown (dropped, or not this job's) or already recorded (a duplicate or
    late notification)."""
    current = find_generation(job, outcome.generation_id)
    if current is None or current.status is not GenerationStatus.PENDING:
        return None
    return [outcome if g.generation_id == outcome.generation_id else g for g in job.generations]


def find_generation(job: Job, generation_id: str) -> Generation | None:
    return next((g for g in job.generations if g.generation_id == generation_id), None)


def ended(generation: Generation, at: str, **changes: Any) -> Generation:
    """`generation` COMPLETED (with `images`) or FAILED (with `error`) at `at`."""
    error = changes.get("error")
    if isinstance(error, Problem) and len(error.message) > MAX_ERROR_CHARS:
        changes["error"] = error.model_copy(update={"message": error.message[: MAX_ERROR_CHARS - 1] + "…"})
    return generation.model_copy(update={**changes, "updated_at": at})


def render_base_model(job: Job) -> str:
    """What the endpoint loads for the job, as its previews did: the stack's copy of a Hub model once
    recorded, else the pinned commit, else the job's reference as named."""
    source = job.base_model_source
    if source is not None:
        return source.mirror_s3_uri or source.pinned_reference
    if job.base_model is None:
        raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"job {job.job_id} has no base model")
    return job.base_model


def render_request(job: Job, generation: Generation, bucket: str) -> PreviewRequest:
    """The endpoint's request for `generation`: the LoRA only, no base pictures, no contact sheet."""
    require_generatable(job)
    artifacts = job.artifacts
    if artifacts is None:  # a COMPLETED job always has them (require_generatable)
        raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"job {job.job_id} has no LoRA")
    settings = generation.settings
    return PreviewRequest(
        job_id=job.job_id,
        base_model=render_base_model(job),
        lora_s3_uri=artifacts.lora_diffusers_s3_uri,
        prompts=generation.prompts,
        steps=settings.steps,
        resolution=settings.resolution,
        seed=settings.seed,
        clip_skip=settings.clip_skip,
        output_s3_prefix=s3_uri(bucket, generation_prefix(job.job_id, generation.generation_id)),
        render_base=False,
        lora_scale=settings.lora_scale,
        negative_prompt=settings.negative_prompt,
        guidance=settings.guidance,
    )


def pending_generation(
    generation_id: str, request: GenerationRequest, settings: GenerationSettings, at: datetime
) -> Generation:
    created = timestamp(at)
    return Generation(
        generation_id=generation_id,
        status=GenerationStatus.PENDING,
        prompts=list(request.prompts),
        settings=settings,
        created_at=created,
        updated_at=created,
    )
