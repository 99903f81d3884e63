"""How failures cross the Step Functions boundary, both ways. This is the one place for that mapping.

Out: a pipeline step that raises `LoraflowError` re-raises it through `task_error`, an exception
class named after the error code. Lambda reports the class name as `errorType`, so Step Functions sees
the error as e.g. `TRAINING_FAILED` (catchable by name in the ASL) and the Cause is
`{"errorMessage": <Problem JSON>, "errorType": "TRAINING_FAILED", ...}`.

In: the `fail` step receives the caught `{"Error", "Cause"}` and turns it back into `Problem`s:

| source | Error | Cause |
|---|---|---|
| failed `createTrainingJob.sync` | e.g. `States.TaskFailed` | DescribeTrainingJob JSON (1) |
| a pipeline Lambda step | our code name or a Python type | `{"errorMessage", "errorType", ...}` |
| the preview callback | `PREVIEW_FAILED` | the endpoint's failure reason (text, may embed our JSON) |
| anything else (`States.Timeout`, ...) | the name | text or empty |

(1) its `FailureReason` holds the container's `{code, path, message}`, maybe prefixed
(`AlgorithmError: `) and cut short (SageMaker keeps 1024 characters).

Unreadable input never raises: it becomes a problem with the fallback code and the raw text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loraflow_shared.errors import ErrorCode, LoraflowError, Problem

MESSAGE_LIMIT = 2000


class TaskError(Exception):
    """Base of the per-code exception classes a Lambda step raises towards Step Functions."""


_TASK_ERRORS: dict[ErrorCode, type[TaskError]] = {
    code: type(code.value, (TaskError,), {"__module__": __name__}) for code in ErrorCode
}


def task_error(exc: LoraflowError) -> TaskError:
    """The exception to raise from a Lambda step so Step Functions names the error after its code."""
    return _TASK_ERRORS[exc.code](exc.to_problem().model_dump_json())


def _known_code(value: object) -> ErrorCode | None:
    return ErrorCode(value) if isinstance(value, str) and value in ErrorCode.__members__ else None


def _json_object_in(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text`, tolerating a prefix and trailing text."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _problem_from_fields(fields: dict[str, Any], default: ErrorCode) -> Problem:
    code = _known_code(fields.get("code"))
    message = str(fields.get("message", "")).strip() or "no reason given"
    if code is None and fields.get("code"):
        message = f"{fields['code']}: {message}"  # a code this version does not know: keep it readable
    return Problem(code=code or default, path=str(fields.get("path") or ""), message=message[:MESSAGE_LIMIT])


# Salvage for JSON cut short (SageMaker keeps 1024 chars of FailureReason); quotes may be escaped.
_CODE = re.compile(r'\\?"code\\?"\s*:\s*\\?"([A-Z_]+)')
_PATH = re.compile(r'\\?"path\\?"\s*:\s*\\?"((?:[^"\\]|\\[^"])*)')
_MESSAGE = re.compile(r'\\?"message\\?"\s*:\s*\\?"((?:[^"\\]|\\[^"])*)')


def _problem_from_text(text: str, default: ErrorCode) -> Problem:
    embedded = _json_object_in(text)
    if embedded is not None and ("code" in embedded or "message" in embedded):
        return _problem_from_fields(embedded, default)
    code, path, message = (pattern.search(text) for pattern in (_CODE, _PATH, _MESSAGE))
    if code or message:
        return _problem_from_fields(
            {
                "code": code.group(1) if code else None,
                "path": path.group(1) if path else "",
                "message": (message.group(1) if message else text) + " [truncated]",
            },
            default,
        )
    return Problem(code=default, path="", message=text.strip()[:MESSAGE_LIMIT] or "no reason given")


def problems_from_task_failure(error: str, cause: str, fallback: ErrorCode) -> list[Problem]:
    """The job's `errors` for a caught Step Functions failure (see the table above)."""
    default = _known_code(error) or fallback
    details = _json_object_in(cause) if cause.lstrip().startswith("{") else None
    if details is not None:
        if "FailureReason" in details:
            return [_problem_from_text(str(details["FailureReason"]), default)]
        if "errorMessage" in details:
            error_type = details.get("errorType")
            type_code = _known_code(error_type)
            message = str(details["errorMessage"])
            problem = _problem_from_text(message, type_code or default)
            if type_code is None and _json_object_in(message) is None and error_type:
                problem = problem.model_copy(update={"message": f"{error_type}: {problem.message}"})
            return [problem]
        if "code" in details or "message" in details:
            return [_problem_from_fields(details, default)]
    if not cause.strip():
        message = f"{error}: no cause given" if error else "no cause given"
        return [Problem(code=default, path="", message=message)]
    return [_problem_from_text(cause, default)]
