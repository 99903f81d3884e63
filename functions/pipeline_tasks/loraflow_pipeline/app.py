"""Lambda entry point for the state machine's `lambda:invoke` steps (`{"action": ..., ...}`).

Domain errors leave as exceptions named after their code (`loraflow_shared.jobs.failures`), so the
state machine sees e.g. `TRAINING_FAILED` as the error name; the payload of a step is returned as is.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.jobs.failures import task_error
from pydantic import ValidationError

from loraflow_pipeline.adapters import build_tasks
from loraflow_pipeline.events import ACTION_ADAPTER, PipelineAction
from loraflow_pipeline.logic import PipelineTasks
from loraflow_pipeline.settings import PipelineSettings

logger = Logger()


@cache
def default_tasks() -> PipelineTasks:
    """Built on the first invocation (cold start) from the environment, then reused."""
    return build_tasks(PipelineSettings.from_environ())


def parse_action(event: Any) -> PipelineAction:
    try:
        return ACTION_ADAPTER.validate_python(event)
    except ValidationError as exc:
        raise LoraflowError(ErrorCode.BAD_REQUEST, f"not a pipeline step payload: {exc}") from exc


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext, tasks: PipelineTasks | None = None) -> Any:
    try:
        action = parse_action(event)
        logger.append_keys(job_id=action.job_id, action=action.action)
        result = (tasks or default_tasks()).run(action)
    except LoraflowError as exc:
        logger.warning("pipeline step failed", code=exc.code.value, path=exc.path, reason=exc.message)
        raise task_error(exc) from exc
    logger.info("pipeline step done")
    return result
