"""JobsApiFunction settings, read from the environment at cold start."""

from loraflow_shared.settings import EnvSettings
from pydantic import Field


class ApiSettings(EnvSettings):
    jobs_table: str = Field(min_length=1)
    artifacts_bucket: str = Field(min_length=1)
    # SigV4 presigned URLs live at most 7 days.
    url_expiry_seconds: int = Field(ge=1, le=604_800)
