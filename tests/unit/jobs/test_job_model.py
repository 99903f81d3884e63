from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from loraflow_shared.dataset.objects import ObjectInfo
from loraflow_shared.jobs.model import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATUSES,
    JobStatus,
    dataset_fingerprint,
    job_id_for,
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


def test_given_dataset_and_fingerprint_when_job_id_derived_then_valid_execution_and_training_job_name() -> (
    None
):
    job_id = job_id_for("0001 dataset with spaces", "f" * 64)
    assert re.fullmatch(r"[0-9a-f]{24}", job_id)
    assert SFN_EXECUTION_NAME.match(job_id)
    assert SAGEMAKER_JOB_NAME.match(training_job_name(job_id))
    assert job_id == job_id_for("0001 dataset with spaces", "f" * 64)
    assert job_id != job_id_for("0002", "f" * 64)


def test_given_the_state_rules_when_inspected_then_terminal_statuses_lead_nowhere() -> None:
    for status in JobStatus:
        assert (not ALLOWED_TRANSITIONS[status]) == (status in TERMINAL_STATUSES)


def test_given_failed_when_predecessors_listed_then_every_running_status_may_fail() -> None:
    assert predecessors(JobStatus.FAILED) == {
        JobStatus.QUEUED,
        JobStatus.TRAINING,
        JobStatus.GENERATING_PREVIEWS,
    }
    assert predecessors(JobStatus.VALIDATING) == set()


def test_given_moments_in_other_zones_when_formatted_then_utc_millis_that_sort_as_text() -> None:
    paris = timezone(timedelta(hours=1))
    earlier = timestamp(datetime(2025, 1, 15, 11, 0, 0, 5000, tzinfo=paris))
    later = timestamp(datetime(2025, 1, 15, 10, 0, 0, 6000, tzinfo=UTC))
    assert earlier == "2025-01-15T10:00:00.005Z"
    assert sorted([later, earlier]) == [earlier, later]
