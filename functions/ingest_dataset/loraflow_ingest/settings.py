"""IngestDatasetFunction settings, read from the environment at cold start."""

from typing import Literal

from loraflow_shared.settings import EnvSettings
from pydantic import Field


class IngestSettings(EnvSettings):
    jobs_table: str = Field(min_length=1)
    notification_topic_arn: str = Field(min_length=1)
    state_machine_arn: str = Field(min_length=1)
    # Superseding a job whose previews render writes the renderer's cancel marker here.
    artifacts_bucket: str = Field(min_length=1)
    # A dataset is validated once its newest object is at least this old (uploads have stopped).
    settle_seconds: int = Field(ge=0, le=900)
    # Used when the dataset's config names no `pretrained_model_name_or_path`.
    default_base_model: str = Field(min_length=1)
    # The stack parameter LargeModelFamilies: without it, jobs of the large model families are rejected.
    large_model_families: Literal["true", "false"]
    # A Hub base model is resolved to its commit at ingest, with this token for gated ones (empty: none).
    hf_token_secret_arn: str = ""

    @property
    def large_models_enabled(self) -> bool:
        return self.large_model_families == "true"
