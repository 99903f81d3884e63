"""Lambda entry point: an SQS batch of (delayed) S3 upload events, with partial batch failures."""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from loraflow_shared.errors import ErrorCode, LoraflowError
from pydantic import ValidationError

from loraflow_ingest.adapters import build_ingestor
from loraflow_ingest.events import DatasetRef, S3Notification, datasets_in
from loraflow_ingest.logic import Ingestor
from loraflow_ingest.settings import IngestSettings

logger = Logger()


@cache
def default_ingestor() -> Ingestor:
    """Built on the first invocation (cold start) from the environment, then reused."""
    return build_ingestor(IngestSettings.from_environ())


class DatasetBatch:
    """Handles each dataset once per batch, however many of its upload events the batch holds.

    A dataset's result is shared by all its records: if ingesting it fails, every record that named
    it is reported as a failure, so SQS redelivers them.
    """

    def __init__(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor
        self._failures: dict[DatasetRef, Exception] = {}
        self._done: set[DatasetRef] = set()

    def handle_record(self, record: SQSRecord) -> None:
        try:
            notification = S3Notification.model_validate_json(record.body)
        except ValidationError as exc:
            raise LoraflowError(
                ErrorCode.BAD_REQUEST, f"message is not an S3 event notification: {exc}"
            ) from exc
        if notification.is_test_event:
            logger.info("ignoring s3:TestEvent", message_id=record.message_id)
            return
        datasets, outside = datasets_in(notification)
        if outside:
            logger.warning("ignoring objects outside any dataset folder", keys=outside)
        for ref in sorted(datasets):
            self._ingest_once(ref)

    def _ingest_once(self, ref: DatasetRef) -> None:
        if ref in self._failures:
            raise self._failures[ref]
        if ref in self._done:
            return
        try:
            outcome, job = self._ingestor.ingest(ref)
        except Exception as exc:
            self._failures[ref] = exc
            raise
        self._done.add(ref)
        logger.info(
            "dataset ingested",
            bucket=ref.bucket,
            dataset=ref.dataset,
            outcome=outcome.value,
            job_id=job.job_id if job else None,
            status=job.status.value if job else None,
        )


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext, ingestor: Ingestor | None = None) -> Any:
    batch = DatasetBatch(ingestor or default_ingestor())
    # Always answer with batchItemFailures (even when all failed) so only failed messages come back.
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return process_partial_response(
        event=event, record_handler=batch.handle_record, processor=processor, context=context
    )
