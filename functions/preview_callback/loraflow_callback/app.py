"""Lambda entry point: the async endpoint's success and error notifications (SNS), and the callback's
own failure queue (SQS: invocations that failed on every try, notifications SNS could not deliver)."""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes import SNSEvent
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from loraflow_callback.adapters import build_callback
from loraflow_callback.events import AsyncInferenceNotification, failed_notifications
from loraflow_callback.logic import Outcome, PreviewCallback
from loraflow_callback.settings import CallbackSettings

logger = Logger()


@cache
def default_callback() -> PreviewCallback:
    """Built on the first invocation (cold start) from the environment, then reused."""
    return build_callback(CallbackSettings.from_environ())


def _log(notification: AsyncInferenceNotification, outcome: Outcome, message: str) -> None:
    log = logger.info if outcome in {Outcome.SUCCEEDED, Outcome.FAILED} else logger.warning
    log(
        message,
        job_id=notification.inference_id,
        invocation_status=notification.invocation_status,
        outcome=outcome.value,
    )


def _handle_sns(event: dict[str, Any], handler: PreviewCallback) -> None:
    for record in SNSEvent(event).records:
        # A malformed message raises: Lambda retries, then the failure queue receives it.
        notification = AsyncInferenceNotification.model_validate_json(record.sns.message)
        _log(notification, handler.handle(notification), "preview notification handled")


def _handle_failure(record: SQSRecord, handler: PreviewCallback) -> None:
    """Fail the job's waiting task with the reason, so the job ends now; an error here keeps the
    message (SQS redrives it, then to the dead-letter queue)."""
    notifications, reason = failed_notifications(record.body)
    for notification in notifications:
        _log(
            notification, handler.fail_waiting_task(notification, reason), "failed preview callback resolved"
        )


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(
    event: dict[str, Any], context: LambdaContext, callback: PreviewCallback | None = None
) -> Any:
    handler = callback or default_callback()
    records = event.get("Records") or []
    if records and records[0].get("eventSource") == "aws:sqs":
        processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
        return process_partial_response(
            event=event,
            record_handler=lambda record: _handle_failure(record, handler),
            processor=processor,
            context=context,
        )
    _handle_sns(event, handler)
    return None
