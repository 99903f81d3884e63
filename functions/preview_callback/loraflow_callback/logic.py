"""Complete the waiting `request_previews` task of a job from the endpoint's notification, or record the
outcome of a generation (its own InferenceId form) on the job."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Protocol

from loraflow_shared.contracts import PreviewResponse
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.failures import problems_from_task_failure
from loraflow_shared.jobs.generations import ended, find_generation, with_outcome
from loraflow_shared.jobs.model import (
    GeneratedImage,
    GenerationStatus,
    parse_generation_inference_id,
    parse_inference_id,
)
from loraflow_shared.jobs.repository import JobRepository
from pydantic import ValidationError

from loraflow_callback.events import AsyncInferenceNotification

CAUSE_LIMIT = 32_768  # Step Functions' limit on a task failure's cause


class TaskTokens(Protocol):
    def succeed(self, token: str, output: str) -> bool:
        """False when the task no longer waits (timed out, execution ended)."""
        ...

    def fail(self, token: str, error: str, cause: str) -> bool: ...


class ResultStore(Protocol):
    def read_text(self, uri: str) -> str | None:
        """The object's text, or None when it does not exist."""
        ...


class Outcome(StrEnum):
    UNKNOWN_JOB = "UNKNOWN_JOB"  # not one of ours, or deleted: nothing to complete
    UNKNOWN_GENERATION = "UNKNOWN_GENERATION"  # not (or no longer: the oldest are dropped) on its job
    ALREADY_RECORDED = "ALREADY_RECORDED"  # a generation's duplicate or late notification
    STALE_ATTEMPT = "STALE_ATTEMPT"  # a result of an attempt the job moved on from (cancelled, retried)
    NO_TASK_TOKEN = "NO_TASK_TOKEN"  # already completed or failed (a duplicate notification)
    TASK_GONE = "TASK_GONE"  # the execution stopped waiting (timeout, stopped)
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class PreviewCallback:
    def __init__(self, repository: JobRepository, tokens: TaskTokens, results: ResultStore) -> None:
        self._repository = repository
        self._tokens = tokens
        self._results = results

    def handle(self, notification: AsyncInferenceNotification) -> Outcome:
        generation = parse_generation_inference_id(notification.inference_id)
        if generation is not None:
            return self._record_generation(*generation, notification)
        token, outcome = self._waiting_token(notification)
        if token is None:
            return outcome
        response, failure = self._response(notification)
        if response is not None:
            delivered = self._tokens.succeed(token, response.model_dump_json())
            return Outcome.SUCCEEDED if delivered else Outcome.TASK_GONE
        delivered = self._tokens.fail(token, ErrorCode.PREVIEW_FAILED.value, failure[:CAUSE_LIMIT])
        return Outcome.FAILED if delivered else Outcome.TASK_GONE

    def fail_waiting_task(self, notification: AsyncInferenceNotification, reason: str) -> Outcome:
        """The job's previews task fails now with `reason`: its result could not be processed (the
        callback failed on every try), so the job ends instead of waiting out PreviewTimeoutSeconds; a
        generation's is recorded FAILED."""
        cause = f"the preview result could not be processed: {reason}"[:CAUSE_LIMIT]
        generation = parse_generation_inference_id(notification.inference_id)
        if generation is not None:
            return self._record(*generation, images=None, error=_problem(cause))
        token, outcome = self._waiting_token(notification)
        if token is None:
            return outcome
        delivered = self._tokens.fail(token, ErrorCode.PREVIEW_FAILED.value, cause)
        return Outcome.FAILED if delivered else Outcome.TASK_GONE

    def _waiting_token(self, notification: AsyncInferenceNotification) -> tuple[str | None, Outcome]:
        """The task token the notification's job and attempt wait with, or why there is none."""
        parsed = parse_inference_id(notification.inference_id)
        job = self._repository.get(parsed[0]) if parsed is not None else None
        if parsed is None or job is None:
            return None, Outcome.UNKNOWN_JOB
        if job.attempt != parsed[1]:
            return None, Outcome.STALE_ATTEMPT
        if not job.preview_task_token:
            return None, Outcome.NO_TASK_TOKEN
        return job.preview_task_token, Outcome.SUCCEEDED

    def _record_generation(
        self, job_id: str, generation_id: str, notification: AsyncInferenceNotification
    ) -> Outcome:
        response, failure = self._response(notification)
        if response is not None and response.job_id != job_id:
            failure = f"the endpoint's response is for job {response.job_id}, not {job_id}"
            response = None
        if response is None:
            return self._record(job_id, generation_id, images=None, error=_problem(failure))
        images = [GeneratedImage(prompt=p.prompt, s3_uri=p.s3_uri) for p in response.previews]
        return self._record(job_id, generation_id, images=images, error=None)

    def _record(
        self, job_id: str, generation_id: str, images: list[GeneratedImage] | None, error: Problem | None
    ) -> Outcome:
        """The generation COMPLETED with `images`, or FAILED with `error`; only while it is PENDING."""
        job = self._repository.get(job_id)
        pending = find_generation(job, generation_id) if job is not None else None
        if job is None or pending is None:
            return Outcome.UNKNOWN_JOB if job is None else Outcome.UNKNOWN_GENERATION
        if images is not None:
            outcome = ended(pending, self._repository.now(), status=GenerationStatus.COMPLETED, images=images)
        else:
            outcome = ended(pending, self._repository.now(), status=GenerationStatus.FAILED, error=error)
        written = self._repository.change_generations(job_id, lambda current: with_outcome(current, outcome))
        if written is None:
            return Outcome.ALREADY_RECORDED
        return Outcome.SUCCEEDED if images is not None else Outcome.FAILED

    def _response(self, notification: AsyncInferenceNotification) -> tuple[PreviewResponse | None, str]:
        """The endpoint's preview response, or why there is none."""
        if not notification.succeeded:
            return None, self._failure_cause(notification)
        location = notification.response_parameters.output_location
        text = self._results.read_text(location) if location else None
        if text is None:
            return None, f"the endpoint reported success but its output is missing: {location or '(none)'}"
        try:
            return PreviewResponse.model_validate_json(text), ""
        except ValidationError as exc:
            return None, f"the endpoint's output at {location} is not a preview response: {exc}"

    def _failure_cause(self, notification: AsyncInferenceNotification) -> str:
        """Our server's `{code, message}` body when the failure file has it, else SageMaker's reason."""
        reason = notification.failure_reason or f"inference {notification.invocation_status}, no reason given"
        location = notification.response_parameters.failure_location
        body = (self._results.read_text(location) or "").strip() if location else ""
        if not body:
            return reason
        try:
            is_object = isinstance(json.loads(body), dict)
        except ValueError:
            is_object = False
        return body if is_object else f"{reason}: {body}"


def _problem(cause: str) -> Problem:
    """A failed render's reason as a problem (our server's `{code, message}` when the cause holds it)."""
    return problems_from_task_failure(ErrorCode.PREVIEW_FAILED.value, cause, ErrorCode.PREVIEW_FAILED)[0]
