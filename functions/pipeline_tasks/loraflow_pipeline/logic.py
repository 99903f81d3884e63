"""The state machine's steps. Each returns the JSON the state machine stores (`{}` when nothing).

Every step names its attempt and writes only while that attempt is the job's current one, so a step
still in flight when its attempt was cancelled (and perhaps retried) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, assert_never

from aws_lambda_powertools import Logger
from loraflow_shared.base_models import BaseModelSource
from loraflow_shared.contracts import PreviewRequest, TrainingReport
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.families import ComputeClass
from loraflow_shared.jobs.capacity import capacity_reason, next_wait_seconds
from loraflow_shared.jobs.compute import ComputeTarget
from loraflow_shared.jobs.cost import PriceTable, failed_training_cost, training_cost
from loraflow_shared.jobs.errors import StaleAttempt
from loraflow_shared.jobs.failures import problems_from_task_failure
from loraflow_shared.jobs.model import (
    Artifacts,
    Attempt,
    Job,
    JobStatus,
    Preview,
    execution_name,
    inference_id,
    job_prefix,
    preview_cancel_key,
    preview_request_key,
    training_job_name,
)
from loraflow_shared.jobs.preview_timing import PreviewTimeouts
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import TerminalNotifier, announce_terminal
from loraflow_shared.s3 import s3_uri
from pydantic import ValidationError

from loraflow_pipeline.base_model_inputs import BaseModelInputs, BaseModelMirrors, base_model_inputs
from loraflow_pipeline.events import (
    Complete,
    Fail,
    MarkTraining,
    PipelineAction,
    PlanTrainingRetry,
    RecordTraining,
    RequestPreviews,
)
from loraflow_pipeline.training_outputs import (
    REPORT_FILENAME,
    OutputLocations,
    kohya_member,
    merge_warnings,
    missing_members,
    training_summary,
)

logger = Logger(child=True)

# Which code a failure gets when its cause says nothing better, by the status the job was in.
_FALLBACK_CODES = {
    JobStatus.TRAINING: ErrorCode.TRAINING_FAILED,
    JobStatus.GENERATING_PREVIEWS: ErrorCode.PREVIEW_FAILED,
}


class ArtifactStore(Protocol):
    def unpack_model_archive(
        self, archive_uri: str, destination_for: Callable[[str], str | None]
    ) -> dict[str, str]:
        """Stream the tar.gz, copy each member `destination_for` maps to a URI; return name -> URI copied."""
        ...

    def read_bytes(self, uri: str) -> bytes: ...

    def put_json(self, uri: str, body: str) -> None: ...


class PreviewEndpoints(Protocol):
    def invoke_async(
        self, endpoint_name: str, input_uri: str, inference_id: str, timeouts: PreviewTimeouts
    ) -> None: ...


class PipelineTasks:
    def __init__(
        self,
        repository: JobRepository,
        notifier: TerminalNotifier,
        artifacts: ArtifactStore,
        endpoints: PreviewEndpoints,
        mirrors: BaseModelMirrors,
        targets: Mapping[ComputeClass, ComputeTarget],
        artifacts_bucket: str,
        preview_timeouts: PreviewTimeouts,
        capacity_wait_seconds: int,
        prices: PriceTable,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._repository = repository
        self._notifier = notifier
        self._artifacts = artifacts
        self._endpoints = endpoints
        self._mirrors = mirrors
        self._targets = targets
        self._bucket = artifacts_bucket
        self._preview_timeouts = preview_timeouts
        self._capacity_wait_s = capacity_wait_seconds
        self._prices = prices
        self._clock = clock

    def run(self, action: PipelineAction) -> dict[str, Any]:
        match action:
            case MarkTraining():
                return self.mark_training(action)
            case PlanTrainingRetry():
                return self.plan_training_retry(action)
            case RecordTraining():
                return self.record_training(action)
            case RequestPreviews():
                return self.request_previews(action)
            case Complete():
                return self.complete(action)
            case Fail():
                return self.fail(action)
            case _:
                assert_never(action)

    def _current(self, job_id: str, attempt: int) -> Job:
        job = self._repository.require(job_id)
        if job.attempt != attempt:
            raise StaleAttempt(job_id, attempt, job.attempt)
        return job

    def mark_training(self, action: MarkTraining) -> dict[str, Any]:
        """→ TRAINING; names the attempt's first training job (the same name when this step is retried)."""
        job = self._current(action.job_id, action.attempt)
        # A job queued before attempts were recorded gets its record now.
        record = job.current_attempt or Attempt(
            number=job.attempt,
            execution_name=execution_name(job.job_id, job.attempt),
            started_at=self._repository.now(),
            execution_arn=job.execution_arn,
        )
        names = record.training_job_names or [training_job_name(job.job_id, job.attempt)]
        inputs = self._inputs(job)
        self._repository.transition(
            job.job_id,
            JobStatus.TRAINING,
            if_attempt=job.attempt,
            attempts=job.with_attempt(record.model_copy(update={"training_job_names": names})),
            base_model_source=inputs.source,
        )
        return self._run(job, names[-1], inputs)

    def _target(self, job: Job) -> ComputeTarget:
        target = self._targets.get(job.compute)
        if target is None:  # ingest rejects such jobs; one queued before a redeployment can still come
            raise LoraflowError(
                ErrorCode.INTERNAL_ERROR,
                f"job {job.job_id} needs {job.compute} compute, which this stack was deployed without",
            )
        return target

    def _inputs(self, job: Job) -> BaseModelInputs:
        if job.base_model is None:
            raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"job {job.job_id} has no base model")
        return base_model_inputs(
            job.job_id, job.dataset_s3_uri, job.base_model, job.base_model_source, self._mirrors
        )

    def _run(
        self, job: Job, training_job_name: str, inputs: BaseModelInputs | None = None, **more: Any
    ) -> dict[str, Any]:
        """What the state machine keeps in `$.run`: the training job's name, instance type, input channels
        and the base model the trainer loads (and the mirror it writes, if any)."""
        inputs = inputs or self._inputs(job)
        return {
            "training_job_name": training_job_name,
            "instance_type": self._target(job).training_instance_type,
            "channels": inputs.channels,
            "base_model": inputs.base_model,
            "base_model_mirror": inputs.mirror_write_uri,
            **more,
        }

    def plan_training_retry(self, action: PlanTrainingRetry) -> dict[str, Any]:
        """After a failed submission: wait and submit again under a new name when it lacked capacity
        and the attempt has waited less than CapacityWaitSeconds; otherwise let it fail."""
        job = self._current(action.job_id, action.attempt)
        record = job.current_attempt
        names = record.training_job_names if record is not None else []
        give_up = self._run(job, names[-1] if names else "", retry=False, wait_seconds=0)
        reason = capacity_reason(action.error.error, action.error.cause or "")
        if record is None or reason is None or job.is_terminal:
            return give_up
        wait = next_wait_seconds(record.capacity_retries)
        started = datetime.fromisoformat(action.execution_started_at)
        if (self._clock() - started).total_seconds() + wait > self._capacity_wait_s:
            logger.warning("no training capacity within CapacityWaitSeconds", reason=reason)
            return give_up
        name = training_job_name(job.job_id, job.attempt, len(names) + 1)
        update = {
            "training_job_names": [*names, name],
            "capacity_retries": record.capacity_retries + 1,
            "waiting_reason": reason,
        }
        self._repository.update(
            job.job_id, if_attempt=job.attempt, attempts=job.with_attempt(record.model_copy(update=update))
        )
        logger.info("waiting for training capacity", reason=reason, wait_seconds=wait, next_name=name)
        return self._run(job, name, retry=True, wait_seconds=wait)

    def record_training(self, action: RecordTraining) -> dict[str, Any]:
        job = self._current(action.job_id, action.attempt)
        locations = OutputLocations.for_job(self._bucket, job.job_id)
        archive = action.training_job.model_artifacts.s3_model_artifacts
        copied = self._artifacts.unpack_model_archive(archive, locations.destination_for)
        missing = missing_members(copied)
        if missing:
            raise LoraflowError(
                ErrorCode.TRAINING_FAILED,
                f"training finished but its model.tar.gz has no {' or '.join(missing)}",
            )
        try:
            report = TrainingReport.model_validate_json(self._artifacts.read_bytes(locations.report_uri))
        except ValidationError as exc:
            raise LoraflowError(ErrorCode.TRAINING_FAILED, f"{REPORT_FILENAME} is not valid: {exc}") from exc
        kohya = kohya_member(report, copied)
        if kohya is None:
            logger.warning("no kohya-format LoRA in model.tar.gz", output_name=report.output_name)
        artifacts = Artifacts(
            lora_diffusers_s3_uri=locations.diffusers_lora_uri,
            training_report_s3_uri=locations.report_uri,
            lora_kohya_s3_uri=copied[kohya] if kohya is not None else None,
        )
        cost = training_cost(action.training_job, self._prices)
        record = job.current_attempt
        self._repository.update(
            job.job_id,
            if_attempt=job.attempt,
            training=training_summary(action.training_job.training_job_name, report),
            artifacts=artifacts,
            warnings=merge_warnings(job.warnings, report.warnings),
            cost=cost,
            attempts=job.with_attempt(record.model_copy(update={"cost": cost, "waiting_reason": None}))
            if record is not None
            else job.attempts,
        )
        return {"lora_s3_uri": locations.diffusers_lora_uri}

    def request_previews(self, action: RequestPreviews) -> dict[str, Any]:
        job = self._current(action.job_id, action.attempt)
        if job.preview is None or job.base_model is None:
            raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"job {job.job_id} has no preview settings")
        inference = inference_id(job.job_id, job.attempt)
        base_model, source = self._preview_base_model(job.base_model, job.base_model_source)
        request = PreviewRequest(
            job_id=job.job_id,
            base_model=base_model,
            lora_s3_uri=action.lora_s3_uri,
            prompts=job.preview.prompts,
            steps=job.preview.steps,
            resolution=job.preview.resolution,
            seed=job.preview.seed,
            clip_skip=job.preview.clip_skip,
            output_s3_prefix=s3_uri(self._bucket, f"{job_prefix(job.job_id)}previews/"),
            cancel_s3_uri=s3_uri(self._bucket, preview_cancel_key(inference)),
        )
        # The token is stored before invoking, so the callback always finds it.
        self._repository.transition(
            job.job_id,
            JobStatus.GENERATING_PREVIEWS,
            if_attempt=job.attempt,
            preview_task_token=action.task_token,
            base_model_source=source,
        )
        input_uri = s3_uri(self._bucket, preview_request_key(inference))
        self._artifacts.put_json(input_uri, request.model_dump_json())
        endpoint = self._target(job).preview_endpoint_name
        self._endpoints.invoke_async(endpoint, input_uri, inference, self._preview_timeouts)
        return {}

    def _preview_base_model(
        self, base_model: str, source: BaseModelSource | None
    ) -> tuple[str, BaseModelSource | None]:
        """The endpoint loads a Hub model from the stack's mirror once published (by this job's trainer,
        usually), else the pinned commit from the Hub."""
        if source is None:
            return base_model, None
        if self._mirrors.published(source.repo, source.commit) is None:
            return source.pinned_reference, source
        uri = self._mirrors.uri(source.repo, source.commit)
        return uri, source.model_copy(update={"mirror_s3_uri": uri})

    def complete(self, action: Complete) -> dict[str, Any]:
        job = self._repository.require(action.job_id)
        if not job.is_terminal:
            if action.previews.job_id != job.job_id:
                raise LoraflowError(
                    ErrorCode.PREVIEW_FAILED, f"preview response is for job {action.previews.job_id}"
                )
            rendered = action.previews
            previews = [
                Preview(prompt=p.prompt, s3_uri=p.s3_uri, base_s3_uri=p.base_s3_uri)
                for p in rendered.previews
            ]
            job = self._repository.transition(
                job.job_id,
                JobStatus.COMPLETED,
                if_attempt=action.attempt,
                previews=previews,
                contact_sheet_s3_uri=rendered.contact_sheet_s3_uri,
                preview_task_token=None,
                attempts=job.attempts_ended(JobStatus.COMPLETED, self._repository.now()),
            )
        announce_terminal(job, self._repository, self._notifier)
        return {}

    def fail(self, action: Fail) -> dict[str, Any]:
        """→ FAILED with the caught error as the job's errors; returns the job's status (a job that was
        cancelled meanwhile stays CANCELLED, and the state machine ends without failing)."""
        job = self._repository.require(action.job_id)
        if not job.is_terminal and job.attempt == action.attempt:
            fallback = _FALLBACK_CODES.get(job.status, ErrorCode.INTERNAL_ERROR)
            cause = action.error.cause or ""
            errors = problems_from_task_failure(action.error.error, cause, fallback)
            cost = failed_training_cost(cause, self._prices)
            # A preview failure's cause is no training job: the cost record_training wrote stays.
            billed: dict[str, Any] = {"cost": cost} if cost is not None else {}
            job = self._repository.transition(
                job.job_id,
                JobStatus.FAILED,
                if_attempt=action.attempt,
                errors=errors,
                preview_task_token=None,
                attempts=job.attempts_ended(JobStatus.FAILED, self._repository.now(), cost),
                **billed,
            )
        if job.attempt != action.attempt:  # retried after a cancel: report how this attempt ended
            ended = next((a.status for a in job.attempts if a.number == action.attempt), None)
            return {"status": (ended or JobStatus.CANCELLED).value}
        job = announce_terminal(job, self._repository, self._notifier)
        return {"status": job.status.value}
