"""PipelineTasksFunction settings, read from the environment at cold start."""

from loraflow_shared.settings import EnvSettings
from pydantic import Field


class PipelineSettings(EnvSettings):
    jobs_table: str = Field(min_length=1)
    notification_topic_arn: str = Field(min_length=1)
    artifacts_bucket: str = Field(min_length=1)
    preview_endpoint_name: str = Field(min_length=1)
