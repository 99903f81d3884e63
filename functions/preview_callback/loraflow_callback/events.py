"""The SageMaker async inference notification (the SNS message body), as far as we use it.

Success: `invocationStatus` "Completed" and `responseParameters.outputLocation`. Failure:
`invocationStatus` "Failed", `failureReason` and (with an S3FailurePath) `responseParameters.failureLocation`.
"""

from __future__ import annotations

import json

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


def failed_notifications(body: str) -> tuple[list[AsyncInferenceNotification], str]:
    """The endpoint notifications inside a message of the callback's failure queue, and why they failed.

    Two producers write there: Lambda's OnFailure destination for this function (an invocation record
    whose `requestPayload` is the SNS event and `responsePayload` the error), and the SNS subscriptions'
    redrive policy (the undeliverable SNS message, its envelope or the bare message).
    """
    document = json.loads(body)
    if isinstance(document, dict) and "requestPayload" in document:
        error = document.get("responsePayload") or {}
        reason = (
            f"{error.get('errorType', 'error')}: {error.get('errorMessage', 'no message')}"
            if isinstance(error, dict)
            else str(error)
        )
        records = (document.get("requestPayload") or {}).get("Records") or []
        messages = [record["Sns"]["Message"] for record in records if "Sns" in record]
        return [AsyncInferenceNotification.model_validate_json(m) for m in messages], reason[:2000]
    if isinstance(document, dict) and document.get("Type") == "Notification":
        document = json.loads(document["Message"])
    reason = "SNS could not deliver the notification to the callback function"
    return [AsyncInferenceNotification.model_validate(document)], reason
