"""Lambda entry point: SNS notifications from the async endpoint's success and error topics."""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes import SNSEvent
from aws_lambda_powertools.utilities.typing import LambdaContext

from loraflow_callback.adapters import build_callback
from loraflow_callback.events import AsyncInferenceNotification
from loraflow_callback.logic import Outcome, PreviewCallback
from loraflow_callback.settings import CallbackSettings

logger = Logger()


@cache
def default_callback() -> PreviewCallback:
    """Built on the first invocation (cold start) from the environment, then reused."""
    return build_callback(CallbackSettings.from_environ())


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(
    event: dict[str, Any], context: LambdaContext, callback: PreviewCallback | None = None
) -> None:
    handler = callback or default_callback()
    for record in SNSEvent(event).records:
        # A malformed message raises: SNS retries, then the function's failure destination keeps it.
        notification = AsyncInferenceNotification.model_validate_json(record.sns.message)
        outcome = handler.handle(notification)
        log = logger.info if outcome in {Outcome.SUCCEEDED, Outcome.FAILED} else logger.warning
        log(
            "preview notification handled",
            job_id=notification.inference_id,
            invocation_status=notification.invocation_status,
            outcome=outcome.value,
        )
