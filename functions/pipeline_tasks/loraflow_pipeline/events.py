"""The payloads the state machine sends (`{"action": ..., ...}`), one model per action."""

from __future__ import annotations

from typing import Annotated, Literal

from loraflow_shared.contracts import PreviewResponse, S3Uri
from loraflow_shared.jobs.cost import TrainingJobDescription
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    job_id: str = Field(min_length=1)
    # Every step names its attempt: a step of an attempt the job moved on from changes nothing.
    attempt: int = Field(ge=1)


class MarkTraining(_Action):
    action: Literal["mark_training"]


class CaughtError(BaseModel):
    """What a Catch with `ResultPath: $.error` stores: Step Functions' error name and cause."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    error: str = Field(default="", alias="Error")
    cause: str | None = Field(default="", alias="Cause")


class PlanTrainingRetry(_Action):
    action: Literal["plan_training_retry"]
    error: CaughtError
    # `$$.Execution.StartTime`: capacity retries stop once the attempt has waited CapacityWaitSeconds.
    execution_started_at: str = Field(min_length=1)


class _ModelArtifacts(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    s3_model_artifacts: S3Uri = Field(alias="S3ModelArtifacts")  # s3://.../model.tar.gz


class CompletedTrainingJob(TrainingJobDescription):
    """The `.sync` task's output: DescribeTrainingJob of the completed job."""

    model_artifacts: _ModelArtifacts = Field(alias="ModelArtifacts")


class RecordTraining(_Action):
    action: Literal["record_training"]
    training_job: CompletedTrainingJob


class RequestPreviews(_Action):
    action: Literal["request_previews"]
    task_token: str = Field(min_length=1)
    lora_s3_uri: S3Uri


class Complete(_Action):
    action: Literal["complete"]
    previews: PreviewResponse


class Fail(_Action):
    action: Literal["fail"]
    error: CaughtError


PipelineAction = Annotated[
    MarkTraining | PlanTrainingRetry | RecordTraining | RequestPreviews | Complete | Fail,
    Field(discriminator="action"),
]
ACTION_ADAPTER: TypeAdapter[PipelineAction] = TypeAdapter(PipelineAction)
