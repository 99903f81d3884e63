"""JobsApiFunction settings, read from the environment at cold start."""

from loraflow_shared.families import ComputeClass
from loraflow_shared.jobs.compute import preview_endpoints
from loraflow_shared.settings import EnvSettings
from pydantic import Field

MAX_URL_EXPIRY_SECONDS = 43_200


class ApiSettings(EnvSettings):
    jobs_table: str = Field(min_length=1)
    artifacts_bucket: str = Field(min_length=1)
    # Job control (cancel, retry): the pipeline to start/stop, where to announce, the ingest queue
    # (a retry of a job that failed before validation ended is validated again).
    state_machine_arn: str = Field(min_length=1)
    notification_topic_arn: str = Field(min_length=1)
    upload_queue_url: str = Field(min_length=1)
    # A presigned URL dies with the signing credentials, the function's role session, whatever its expiry
    # says (S3 "Sharing objects with presigned URLs"): 12 h, as the template's UrlExpirySeconds MaxValue.
    url_expiry_seconds: int = Field(ge=1, le=MAX_URL_EXPIRY_SECONDS)
    # Generations render on the job's compute class's preview endpoint, as its previews did.
    preview_endpoint_name: str = Field(min_length=1)
    large_model_preview_endpoint_name: str = ""  # empty: the stack has no large compute (LargeModelFamilies)

    @property
    def preview_endpoints(self) -> dict[ComputeClass, str]:
        return preview_endpoints(self.preview_endpoint_name, self.large_model_preview_endpoint_name)
