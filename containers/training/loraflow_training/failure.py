"""SageMaker's failure file: `{code, path, message}` JSON that becomes the job's `FailureReason`."""

from __future__ import annotations

import json
from pathlib import Path

from loraflow_shared.errors import ErrorCode, LoraflowError, Problem

# SageMaker keeps the first 1024 characters of the failure file; the JSON must stay whole within them.
MAX_FAILURE_CHARS = 1024
_ELLIPSIS = "…"


def problem_for(exc: BaseException) -> Problem:
    """A domain error as it is; anything else as TRAINING_FAILED with its one-line message."""
    if isinstance(exc, LoraflowError):
        return exc.to_problem()
    lines = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return Problem(code=ErrorCode.TRAINING_FAILED, path="", message=detail)


def failure_json(problem: Problem) -> str:
    """The JSON, with the message shortened (never the code or path) until it fits."""
    message = problem.message
    while True:
        text = json.dumps(
            {"code": str(problem.code), "path": problem.path, "message": message}, ensure_ascii=False
        )
        excess = len(text) - MAX_FAILURE_CHARS
        if excess <= 0 or message == _ELLIPSIS:
            return text
        message = message[: max(0, len(message) - excess - len(_ELLIPSIS))] + _ELLIPSIS


def write_failure(failure_file: Path, problem: Problem, keep_existing: bool = False) -> None:
    """Write the failure file; with `keep_existing`, a reason another process wrote first stays."""
    failure_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with failure_file.open("x" if keep_existing else "w", encoding="utf-8") as out:
            out.write(failure_json(problem))
    except FileExistsError:
        pass
