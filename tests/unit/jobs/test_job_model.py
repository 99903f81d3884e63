from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from loraflow_shared.dataset.objects import ObjectInfo
from loraflow_shared.jobs.model import (
    ALLOWED_TRANSITIONS,
    RETRYABLE_STATUSES,
    TERMINAL_STATUSES,
    JobStatus,
    dataset_fingerprint,
    execution_name,
    inference_id,
    is_job_id,
    job_id_for,
    parse_inference_id,
    predecessors,
    timestamp,
    training_job_name,
)

SAGEMAKER_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
SFN_EXECUTION_NAME = re.compile(r"^[0-9a-zA-Z_-]{1,80}$")
MOMENT = datetime(2025, 1, 15, 10, 0, tzinfo=UTC)


def _objects(*entries: tuple[str, str, int]) -> list[ObjectInfo]:
    return [ObjectInfo(key=k, etag=e, size=s, last_modified=MOMENT) for k, e, s in entries]


def test_given_same_listing_in_another_order_when_fingerprinted_then_same_fingerprint() -> None:
    listing = [("ds/a.toml", "e1", 10), ("ds/1_x/a.png", "e2", 20)]
    assert dataset_fingerprint(_objects(*listing)) == dataset_fingerprint(_objects(*reversed(listing)))


def test_given_one_changed_etag_when_fingerprinted_then_fingerprint_changes() -> None:
    before = _objects(("ds/a.toml", "e1", 10), ("ds/1_x/a.png", "e2", 20))
    after = _objects(("ds/a.toml", "e1", 10), ("ds/1_x/a.png", "e3", 20))
    assert dataset_fingerprint(before) != dataset_fingerprint(after)


def test_given_a_key_moved_between_fields_when_fingerprinted_then_no_collision() -> None:
    # Separators keep (key="ab", etag="c") apart from (key="a", etag="bc").
    assert dataset_fingerprint(_objects(("ab", "c", 1))) != dataset_fingerprint(_objects(("a", "bc", 1)))


def test_given_dataset_and_fingerprint_when_job_id_derived_then_deterministic_hex() -> None:
    job_id = job_id_for("0001 dataset with spaces", "f" * 64)
    assert re.fullmatch(r"[0-9a-f]{24}", job_id) and is_job_id(job_id)
    assert job_id == job_id_for("0001 dataset with spaces", "f" * 64)
    assert job_id != job_id_for("0002", "f" * 64)


def test_given_many_attempts_and_resubmissions_when_named_then_valid_unique_aws_names() -> None:
    job_id = job_id_for("0001", "f" * 64)
    names = {
        training_job_name(job_id, attempt, submission) for attempt in (1, 99) for submission in (1, 9999)
    }
    assert len(names) == 4
    assert all(SAGEMAKER_JOB_NAME.match(name) and name.startswith("loraflow-") for name in names)
    assert SFN_EXECUTION_NAME.match(execution_name(job_id, 999))
    assert execution_name(job_id, 1) != execution_name(job_id, 2)


def test_given_inference_ids_when_parsed_then_job_and_attempt_or_none() -> None:
    job_id = job_id_for("0001", "f" * 64)
    assert parse_inference_id(inference_id(job_id, 12)) == (job_id, 12)
    assert parse_inference_id(job_id) == (job_id, 1)  # requests sent before attempts were counted
    for foreign in ("", "not-ours", f"{job_id}-x", f"{job_id.upper()}-1", "../" + job_id):
        assert parse_inference_id(foreign) is None


def test_given_the_state_rules_when_inspected_then_only_retryable_terminal_statuses_lead_anywhere() -> None:
    for status in TERMINAL_STATUSES - RETRYABLE_STATUSES:
        assert not ALLOWED_TRANSITIONS[status]
    for status in RETRYABLE_STATUSES:
        assert ALLOWED_TRANSITIONS[status] == {JobStatus.QUEUED, JobStatus.VALIDATING}
    assert RETRYABLE_STATUSES < TERMINAL_STATUSES


def test_given_failed_and_cancelled_when_predecessors_listed_then_every_unfinished_status() -> None:
    unfinished = {JobStatus.VALIDATING, JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS}
    assert predecessors(JobStatus.FAILED) == unfinished
    assert predecessors(JobStatus.CANCELLED) == unfinished
    assert predecessors(JobStatus.VALIDATING) == RETRYABLE_STATUSES


def test_given_moments_in_other_zones_when_formatted_then_utc_millis_that_sort_as_text() -> None:
    paris = timezone(timedelta(hours=1))
    earlier = timestamp(datetime(2025, 1, 15, 11, 0, 0, 5000, tzinfo=paris))
    later = timestamp(datetime(2025, 1, 15, 10, 0, 0, 6000, tzinfo=UTC))
    assert earlier == "2025-01-15T10:00:00.005Z"
    assert sorted([later, earlier]) == [earlier, later]
