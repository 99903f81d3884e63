"""The state machine's steps. Each returns the JSON the state machine stores (`{}` when nothing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, assert_never

from aws_lambda_powertools import Logger
from loraflow_shared.contracts import PreviewRequest, TrainingReport
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.jobs.failures import problems_from_task_failure
from loraflow_shared.jobs.model import Artifacts, JobStatus, Preview
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import TerminalNotifier, announce_terminal
from loraflow_shared.s3 import s3_uri
from pydantic import ValidationError

from loraflow_pipeline.events import (
    Complete,
    Fail,
    MarkTraining,
    PipelineAction,
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


class PreviewEndpoint(Protocol):
    def invoke_async(self, input_uri: str, inference_id: str) -> None: ...


class PipelineTasks:
    def __init__(
        self,
        repository: JobRepository,
        notifier: TerminalNotifier,
        artifacts: ArtifactStore,
        endpoint: PreviewEndpoint,
        artifacts_bucket: str,
    ) -> None:
        self._repository = repository
        self._notifier = notifier
        self._artifacts = artifacts
        self._endpoint = endpoint
        self._bucket = artifacts_bucket

    def run(self, action: PipelineAction) -> dict[str, Any]:
        match action:
            case MarkTraining():
                self._repository.transition(action.job_id, JobStatus.TRAINING)
                return {}
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

    def record_training(self, action: RecordTraining) -> dict[str, Any]:
        job = self._repository.require(action.job_id)
        locations = OutputLocations.for_job(self._bucket, job.job_id)
        copied = self._artifacts.unpack_model_archive(action.model_artifacts, locations.destination_for)
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
        self._repository.update(
            job.job_id,
            training=training_summary(action.training_job_name, report),
            artifacts=artifacts,
            warnings=merge_warnings(job.warnings, report.warnings),
        )
        return {"lora_s3_uri": locations.diffusers_lora_uri}

    def request_previews(self, action: RequestPreviews) -> dict[str, Any]:
        job = self._repository.require(action.job_id)
        if job.preview is None or job.base_model is None:
            raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"job {job.job_id} has no preview settings")
        request = PreviewRequest(
            job_id=job.job_id,
            base_model=job.base_model,
            lora_s3_uri=action.lora_s3_uri,
            prompts=job.preview.prompts,
            steps=job.preview.steps,
            resolution=job.preview.resolution,
            seed=job.preview.seed,
            clip_skip=job.preview.clip_skip,
            output_s3_prefix=s3_uri(self._bucket, f"jobs/{job.job_id}/previews/"),
        )
        # The token is stored before invoking, so the callback always finds it.
        self._repository.transition(
            job.job_id, JobStatus.GENERATING_PREVIEWS, preview_task_token=action.task_token
        )
        input_uri = s3_uri(self._bucket, f"async-inference/requests/{job.job_id}.json")
        self._artifacts.put_json(input_uri, request.model_dump_json())
        self._endpoint.invoke_async(input_uri, inference_id=job.job_id)
        return {}

    def complete(self, action: Complete) -> dict[str, Any]:
        job = self._repository.require(action.job_id)
        if not job.is_terminal:
            if action.previews.job_id != job.job_id:
                raise LoraflowError(
                    ErrorCode.PREVIEW_FAILED, f"preview response is for job {action.previews.job_id}"
                )
            previews = [Preview(prompt=p.prompt, s3_uri=p.s3_uri) for p in action.previews.previews]
            job = self._repository.transition(
                job.job_id, JobStatus.COMPLETED, previews=previews, preview_task_token=None
            )
        announce_terminal(job, self._repository, self._notifier)
        return {}

    def fail(self, action: Fail) -> dict[str, Any]:
        job = self._repository.require(action.job_id)
        if not job.is_terminal:  # a late or repeated failure never overwrites a final outcome
            fallback = _FALLBACK_CODES.get(job.status, ErrorCode.INTERNAL_ERROR)
            errors = problems_from_task_failure(action.error.error, action.error.cause or "", fallback)
            job = self._repository.transition(
                job.job_id, JobStatus.FAILED, errors=errors, preview_task_token=None
            )
        announce_terminal(job, self._repository, self._notifier)
        return {}
