"""The SageMaker async inference notification (the SNS message body), as far as we use it.

Success: `invocationStatus` "Completed" and `responseParameters.outputLocation`. Failure:
`invocationStatus` "Failed", `failureReason` and (with an S3FailurePath) `responseParameters.failureLocation`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

COMPLETED = "Completed"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class ResponseParameters(_Lenient):
    content_type: str | None = Field(default=None, alias="contentType")
    output_location: str | None = Field(default=None, alias="outputLocation")
    failure_location: str | None = Field(default=None, alias="failureLocation")


class AsyncInferenceNotification(_Lenient):
    invocation_status: str = Field(alias="invocationStatus")
    inference_id: str = Field(min_length=1, alias="inferenceId")
    failure_reason: str | None = Field(default=None, alias="failureReason")
    response_parameters: ResponseParameters = Field(
        default_factory=ResponseParameters, alias="responseParameters"
    )

    @property
    def succeeded(self) -> bool:
        return self.invocation_status == COMPLETED
