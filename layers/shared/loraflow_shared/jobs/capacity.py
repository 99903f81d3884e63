"""Which training failures mean "no capacity now, try again later", and how long to wait.

A training job that cannot start for lack of GPUs is not the user's fault: the pipeline waits and
submits it again (under a new name: SageMaker never reuses one), for at most the stack's
`CapacityWaitSeconds`. That is also how jobs queue when more datasets arrive than the account's
instance quota allows. The signals, as AWS documents them:

- `SageMaker.ResourceLimitExceededException` or `ThrottlingException`: the quota is full or the API
  throttles, at CreateTrainingJob;
- `SageMaker.AmazonSageMakerException` whose cause says "Error Code: ResourceLimitExceeded" (or a
  throttling/internal code): the same, as the optimised integration often names it;
- `States.TaskFailed`, TrainingJobStatus `Failed`, FailureReason starting `CapacityError`: no
  instance of the type is available;
- `States.TaskFailed`, TrainingJobStatus `Stopped`, SecondaryStatus `MaxWaitTimeExceeded`: managed
  spot capacity did not come within `MaxWaitTimeInSeconds`.

(The last two are how AWS Batch's SageMaker integration detects insufficient capacity: AWS Batch User
Guide, "Jobs stuck in RUNNABLE due to capacity".) Everything else is a real failure.
"""

from __future__ import annotations

import json
import re
from typing import Any

RETRYABLE_ERROR_NAMES = frozenset(
    {
        "SageMaker.ResourceLimitExceededException",
        "SageMaker.ThrottlingException",
        "ThrottlingException",
    }
)
SERVICE_ERROR = "SageMaker.AmazonSageMakerException"
RETRYABLE_SERVICE_CODES = frozenset(
    {"ResourceLimitExceeded", "ThrottlingException", "Throttling", "InternalFailure", "ServiceUnavailable"}
)
# The optimised integration's cause ends "(Service: AmazonSageMaker; Status Code: 400; Error Code: X; ...)".
_SERVICE_CODE = re.compile(r"Error Code: ([A-Za-z]+)")
_CAPACITY_FAILURE_PREFIXES = ("CapacityError", "InternalServerError")
_CAPACITY_STOP_STATUSES = frozenset({"MaxWaitTimeExceeded"})

FIRST_WAIT_S = 60
MAX_WAIT_S = 900


def capacity_reason(error: str, cause: str) -> str | None:
    """A short reason when the failure is a lack of capacity or quota (retry later), else None."""
    if error in RETRYABLE_ERROR_NAMES:
        return f"{error}: {_first_line(cause)}"
    if error == SERVICE_ERROR:
        code = _SERVICE_CODE.search(cause)
        return (
            f"{code.group(1)}: {_first_line(cause)}"
            if code and code.group(1) in RETRYABLE_SERVICE_CODES
            else None
        )
    if error == "States.TaskFailed":
        return _training_job_capacity(cause)
    return None


def _training_job_capacity(cause: str) -> str | None:
    try:
        description: Any = json.loads(cause)
    except ValueError:
        return None
    if not isinstance(description, dict):
        return None
    status = description.get("TrainingJobStatus")
    reason = str(description.get("FailureReason") or "")
    if status == "Failed" and reason.startswith(_CAPACITY_FAILURE_PREFIXES):
        return _first_line(reason)
    if status == "Stopped" and description.get("SecondaryStatus") in _CAPACITY_STOP_STATUSES:
        return f"{description['SecondaryStatus']}: no spot capacity within MaxWaitTimeInSeconds"
    return None


def next_wait_seconds(retries_so_far: int) -> int:
    """Exponential backoff: 60 s, 120 s, 240 s, ... capped at 15 minutes."""
    return min(FIRST_WAIT_S * 2 ** min(retries_so_far, 10), MAX_WAIT_S)


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no reason given"
    return line[:limit]
