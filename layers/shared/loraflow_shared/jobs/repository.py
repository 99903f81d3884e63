"""DynamoDB access for jobs: claims, guarded status transitions, listings by dataset.

Every status change is a conditional write, so the state rules in `model.ALLOWED_TRANSITIONS` hold
even when steps are retried or race. A transition to the status a job already has is accepted and
re-applies the given fields: a retried step (same Lambda payload, new task token) is therefore safe.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

from boto3.dynamodb.conditions import Attr, Key
from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python

from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.jobs.errors import InvalidTransition, JobNotFound, StaleAttempt
from loraflow_shared.jobs.model import (
    TERMINAL_STATUSES,
    Generation,
    Job,
    JobStatus,
    StatusChange,
    predecessors,
    timestamp,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

DATASET_INDEX = "by_dataset"
# Every job, newest first: a GSI whose partition key is one constant attribute that `claim` writes. One
# partition takes ~1000 writes/s, far above a training service's rate of new jobs; items written before
# the attribute existed are not in this index (they stay in `by_dataset`).
CREATED_INDEX = "by_created"
LISTING_ATTRIBUTE = "listing"
LISTING_PARTITION = "jobs"
GENERATION_WRITE_TRIES = 5  # concurrent changes of one job's generations (requests, results) are rare
# Identity and history fields: set once by `claim`, never by `update`/`transition`.
_IMMUTABLE_FIELDS = frozenset(
    {"job_id", "dataset", "created_at", "fingerprint", "status", "updated_at", "history"}
)


class ClaimResult(NamedTuple):
    job: Job
    created: bool


def to_dynamo(value: Any) -> Any:
    """JSON-shaped data with floats as Decimal (the DynamoDB resource API refuses floats)."""
    return json.loads(json.dumps(to_jsonable_python(value)), parse_float=Decimal)


@cache
def _field_adapter(name: str) -> TypeAdapter[Any]:
    return TypeAdapter(Job.model_fields[name].annotation)


def _validated_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Check names and types before writing, so a bad update fails here rather than on the next read."""
    unknown = set(fields) - set(Job.model_fields)
    if unknown or _IMMUTABLE_FIELDS & set(fields):
        raise ValueError(f"cannot update job fields {sorted(unknown | (_IMMUTABLE_FIELDS & set(fields)))}")
    return {name: _field_adapter(name).validate_python(value) for name, value in fields.items()}


class JobRepository:
    def __init__(self, table: Table, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._table = table
        self._clock = clock
        self._conditional_failed = table.meta.client.exceptions.ConditionalCheckFailedException

    def now(self) -> str:
        return timestamp(self._clock())

    def claim(self, job: Job) -> ClaimResult:
        """Create `job` unless a job with its id exists; then return that one (`created=False`)."""
        first = StatusChange(status=job.status, at=job.created_at)
        job = job.model_copy(update={"history": job.history or [first]})
        try:
            self._table.put_item(
                Item={**to_dynamo(job), LISTING_ATTRIBUTE: LISTING_PARTITION},
                ConditionExpression="attribute_not_exists(job_id)",
            )
        except self._conditional_failed:
            existing = self.get(job.job_id)
            if existing is None:  # deleted between the two calls: nothing sane to resume
                raise LoraflowError(
                    ErrorCode.INTERNAL_ERROR, f"job {job.job_id} vanished while claimed"
                ) from None
            return ClaimResult(existing, created=False)
        return ClaimResult(job, created=True)

    def get(self, job_id: str) -> Job | None:
        item = self._table.get_item(Key={"job_id": job_id}, ConsistentRead=True).get("Item")
        return None if item is None else Job.model_validate(item)

    def require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        if_attempt: int | None = None,
        from_statuses: Iterable[JobStatus] | None = None,
        **fields: Any,
    ) -> Job:
        """Move the job to `to` (allowed predecessors or `to` itself) and set `fields` in the same write.

        With `if_attempt`, the write only happens while that attempt is the job's current one, so a late
        step of a cancelled attempt cannot touch the retry that followed it (`StaleAttempt`).
        `from_statuses` narrows the statuses it may come from: validation's QUEUED comes only from
        VALIDATING, a retry's only from FAILED/CANCELLED (both would otherwise allow the other's).
        """
        allowed = sorted(_sources(to, from_statuses))
        now = self.now()
        values = {**_validated_fields(fields), "status": to, "updated_at": now}
        placeholders = ", ".join(f":allowed{i}" for i in range(len(allowed)))
        condition, extra = _attempt_condition(if_attempt)
        try:
            return self._write(
                job_id,
                values,
                condition=f"attribute_exists(job_id) AND #status IN ({placeholders}){condition}",
                extra_values={**extra, **{f":allowed{i}": status.value for i, status in enumerate(allowed)}},
                history=StatusChange(status=to, at=now),
            )
        except self._conditional_failed:
            current = self.require(job_id)
            if if_attempt is not None and current.attempt != if_attempt:
                raise StaleAttempt(job_id, if_attempt, current.attempt) from None
            raise InvalidTransition(job_id, current.status, to) from None

    def update(self, job_id: str, *, if_attempt: int | None = None, **fields: Any) -> Job:
        """Set `fields` without changing the status (only while `if_attempt` is current, when given)."""
        values = {**_validated_fields(fields), "updated_at": self.now()}
        condition, extra = _attempt_condition(if_attempt)
        try:
            return self._write(
                job_id, values, condition="attribute_exists(job_id)" + condition, extra_values=extra
            )
        except self._conditional_failed:
            current = self.require(job_id)
            if if_attempt is not None:
                raise StaleAttempt(job_id, if_attempt, current.attempt) from None
            raise

    def change_generations(self, job_id: str, change: Callable[[Job], list[Generation] | None]) -> Job | None:
        """Set the job's generations to `change(job)`, unless another write changed them since the read
        (`generations_revision`: then read and change again). `change` returns None to write nothing (and
        so does this) or raises to refuse. `updated_at` stays: a generation does not change the job's run.
        """
        for _ in range(GENERATION_WRITE_TRIES):
            job = self.require(job_id)
            generations = change(job)
            if generations is None:
                return None
            revision = job.generations_revision
            legacy = " OR attribute_not_exists(#generations_revision)" if revision == 0 else ""
            values = {"generations": generations, "generations_revision": revision + 1}
            try:
                return self._write(
                    job_id,
                    _validated_fields(values),
                    condition=f"attribute_exists(job_id) AND (#generations_revision = :revision{legacy})",
                    extra_values={":revision": revision},
                )
            except self._conditional_failed:
                continue
        raise LoraflowError(
            ErrorCode.INTERNAL_ERROR,
            f"job {job_id}: its generations changed under {GENERATION_WRITE_TRIES} writes",
        )

    def _write(
        self,
        job_id: str,
        values: dict[str, Any],
        condition: str,
        extra_values: dict[str, Any],
        history: StatusChange | None = None,
    ) -> Job:
        """SET `values` under `condition`; with `history`, append it to the job's timeline (same write)."""
        names = {f"#f{i}": name for i, name in enumerate(values)}
        # DynamoDB rejects names an expression does not use.
        for placeholder in ("#status", "#attempt", "#generations_revision"):
            if placeholder in condition:
                names[placeholder] = placeholder[1:]
        expression_values = {f":v{i}": to_dynamo(value) for i, value in enumerate(values.values())}
        assignments = [f"#f{i} = :v{i}" for i in range(len(values))]
        if history is not None:
            names["#history"] = "history"
            expression_values |= {":history": to_dynamo([history]), ":no_history": []}
            assignments.append("#history = list_append(if_not_exists(#history, :no_history), :history)")
        response = self._table.update_item(
            Key={"job_id": job_id},
            UpdateExpression="SET " + ", ".join(assignments),
            ConditionExpression=condition,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={**expression_values, **extra_values},
            ReturnValues="ALL_NEW",
        )
        return Job.model_validate(response["Attributes"])

    def unfinished(self) -> list[Job]:
        """Every job not in a terminal status (a full scan: for operations and the local cloud's restart,
        never on a request path)."""
        running = [status.value for status in JobStatus if status not in TERMINAL_STATUSES]
        jobs: list[Job] = []
        query: dict[str, Any] = {"FilterExpression": Attr("status").is_in(running)}
        while True:
            page = self._table.scan(**query)
            jobs += [Job.model_validate(item) for item in page.get("Items", [])]
            if "LastEvaluatedKey" not in page:
                return jobs
            query["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def list_by_dataset(
        self, dataset: str, limit: int = 20, next_token: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Jobs of one dataset, newest first, one page at a time."""
        return self._newest_first(DATASET_INDEX, "dataset", dataset, limit, next_token)

    def list_all(self, limit: int = 20, next_token: str | None = None) -> tuple[list[Job], str | None]:
        """Every job (since the listing attribute was written), newest first, one page at a time."""
        return self._newest_first(CREATED_INDEX, LISTING_ATTRIBUTE, LISTING_PARTITION, limit, next_token)

    def _newest_first(
        self, index: str, attribute: str, value: str, limit: int, next_token: str | None
    ) -> tuple[list[Job], str | None]:
        query: dict[str, Any] = {
            "IndexName": index,
            "KeyConditionExpression": Key(attribute).eq(value),
            "ScanIndexForward": False,
            "Limit": limit,
        }
        if next_token:
            query["ExclusiveStartKey"] = decode_page_token(next_token, attribute, value)
        response = self._table.query(**query)
        jobs = [Job.model_validate(item) for item in response.get("Items", [])]
        last_key = response.get("LastEvaluatedKey")
        return jobs, encode_page_token(last_key) if last_key else None


def _sources(to: JobStatus, narrowed: Iterable[JobStatus] | None) -> set[JobStatus]:
    allowed = set(predecessors(to)) | {to}
    if narrowed is None:
        return allowed
    chosen = set(narrowed)
    if not chosen <= allowed:
        raise ValueError(f"{sorted(chosen - allowed)} may never move to {to.value}")
    return chosen


def _attempt_condition(attempt: int | None) -> tuple[str, dict[str, Any]]:
    """The condition (and its values) that the job still runs `attempt`; records from before attempts
    were counted have no `attempt` attribute and run attempt 1."""
    if attempt is None:
        return "", {}
    legacy = " OR attribute_not_exists(#attempt)" if attempt == 1 else ""
    return f" AND (#attempt = :attempt{legacy})", {":attempt": attempt}


def encode_page_token(last_evaluated_key: dict[str, Any]) -> str:
    raw = json.dumps(to_jsonable_python(last_evaluated_key), sort_keys=True, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, attribute: str, value: str) -> dict[str, str]:
    """The DynamoDB start key inside a `next_token`; anything else is the caller's error, not ours."""
    invalid = LoraflowError(ErrorCode.BAD_REQUEST, "next_token is not a token returned by this listing")
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise invalid from exc
    if (
        not isinstance(decoded, dict)
        or set(decoded) != {"job_id", "created_at", attribute}
        or not all(isinstance(item, str) for item in decoded.values())
        or decoded[attribute] != value
    ):
        raise invalid
    return decoded
