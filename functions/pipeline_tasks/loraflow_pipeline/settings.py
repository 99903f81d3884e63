"""PipelineTasksFunction settings, read from the environment at cold start."""

from loraflow_shared.families import ComputeClass
from loraflow_shared.jobs.compute import ComputeTarget, preview_endpoints
from loraflow_shared.jobs.cost import parse_price_table
from loraflow_shared.jobs.preview_timing import MAX_PREVIEW_TIMEOUT_S, MIN_PREVIEW_TIMEOUT_S
from loraflow_shared.settings import EnvSettings
from pydantic import Field, field_validator


class PipelineSettings(EnvSettings):
    jobs_table: str = Field(min_length=1)
    notification_topic_arn: str = Field(min_length=1)
    artifacts_bucket: str = Field(min_length=1)
    # Per compute class (`loraflow_shared.families.ComputeClass`): the training instance and preview endpoint.
    training_instance_type: str = Field(pattern=r"^ml\.")
    large_model_training_instance_type: str = Field(pattern=r"^ml\.")
    preview_endpoint_name: str = Field(min_length=1)
    large_model_preview_endpoint_name: str = ""  # empty: the stack has no large compute (LargeModelFamilies)
    # The state machine's wait for previews; the async request's TTL and timeout are derived from it.
    preview_timeout_seconds: int = Field(ge=MIN_PREVIEW_TIMEOUT_S, le=MAX_PREVIEW_TIMEOUT_S)
    # How long an attempt keeps resubmitting a training job that lacks capacity or quota.
    capacity_wait_seconds: int = Field(ge=0, le=604_800)
    # `ml.<type>=<USD per hour>,...`: the per-job cost estimate.
    training_prices_per_hour: str = ""

    @field_validator("training_prices_per_hour")
    @classmethod
    def _parsable(cls, value: str) -> str:
        parse_price_table(value)  # a typo in the stack parameter stops the cold start, naming it
        return value

    @property
    def prices(self) -> dict[str, float]:
        return parse_price_table(self.training_prices_per_hour)

    @property
    def targets(self) -> dict[ComputeClass, ComputeTarget]:
        instance_types: dict[ComputeClass, str] = {
            "standard": self.training_instance_type,
            "large": self.large_model_training_instance_type,
        }
        endpoints = preview_endpoints(self.preview_endpoint_name, self.large_model_preview_endpoint_name)
        return {compute: ComputeTarget(instance_types[compute], name) for compute, name in endpoints.items()}
