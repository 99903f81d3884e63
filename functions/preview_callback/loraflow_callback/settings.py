"""PreviewCallbackFunction settings, read from the environment at cold start."""

from loraflow_shared.settings import EnvSettings
from pydantic import Field


class CallbackSettings(EnvSettings):
    jobs_table: str = Field(min_length=1)
