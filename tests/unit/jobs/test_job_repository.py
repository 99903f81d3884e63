from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from jobs_aws import new_job
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem
from loraflow_shared.jobs.errors import InvalidTransition, JobNotFound
from loraflow_shared.jobs.model import JobStatus, TrainingSummary
from loraflow_shared.jobs.repository import JobRepository


def test_given_a_claimed_job_when_claimed_again_then_existing_job_returned(repository: JobRepository) -> None:
    first = repository.claim(new_job())
    repository.transition(first.job.job_id, JobStatus.REJECTED)
    second = repository.claim(new_job())
    assert first.created is True
    assert second.created is False
    assert second.job.status is JobStatus.REJECTED


def test_given_queued_job_when_moved_to_training_then_status_and_timestamp_updated(
    repository: JobRepository,
) -> None:
    job = repository.claim(new_job()).job
    repository.transition(job.job_id, JobStatus.QUEUED)
    moved = repository.transition(job.job_id, JobStatus.TRAINING)
    assert moved.status is JobStatus.TRAINING
    assert moved.updated_at > job.updated_at
    assert repository.require(job.job_id) == moved


def test_given_validating_job_when_moved_to_training_then_invalid_transition_names_current_status(
    repository: JobRepository,
) -> None:
    job = repository.claim(new_job()).job
    with pytest.raises(InvalidTransition) as raised:
        repository.transition(job.job_id, JobStatus.TRAINING)
    assert raised.value.current is JobStatus.VALIDATING
    assert "VALIDATING" in raised.value.message
    assert repository.require(job.job_id).status is JobStatus.VALIDATING


def test_given_job_in_target_status_when_transition_retried_then_fields_reapplied(
    repository: JobRepository,
) -> None:
    job_id = repository.claim(new_job()).job.job_id
    repository.transition(job_id, JobStatus.QUEUED)
    repository.transition(job_id, JobStatus.TRAINING)
    repository.transition(job_id, JobStatus.GENERATING_PREVIEWS, preview_task_token="first")
    retried = repository.transition(job_id, JobStatus.GENERATING_PREVIEWS, preview_task_token="second")
    assert retried.status is JobStatus.GENERATING_PREVIEWS
    assert retried.preview_task_token == "second"


def test_given_unknown_job_when_transitioned_then_job_not_found(repository: JobRepository) -> None:
    with pytest.raises(JobNotFound) as raised:
        repository.transition("0" * 24, JobStatus.QUEUED)
    assert raised.value.code is ErrorCode.JOB_NOT_FOUND


def test_given_floats_and_problems_when_stored_then_they_round_trip(repository: JobRepository) -> None:
    job_id = repository.claim(new_job()).job.job_id
    training = TrainingSummary(job_name="loraflow-x", steps=3, final_loss=0.123456789012, seconds=1.5)
    problem = Problem(code=ErrorCode.IGNORED_CONFIG_KEY, path="config.toml", message="xformers is ignored")
    repository.update(job_id, training=training, warnings=[problem])
    stored = repository.require(job_id)
    assert stored.training == training
    assert stored.warnings == [problem]


def test_given_unknown_or_identity_field_when_updated_then_refused_before_writing(
    repository: JobRepository,
) -> None:
    job = repository.claim(new_job()).job
    with pytest.raises(ValueError, match="trainin"):
        repository.update(job.job_id, trainin={"steps": 1})
    with pytest.raises(ValueError, match="status"):
        repository.update(job.job_id, status=JobStatus.COMPLETED)
    assert repository.require(job.job_id) == job


def _claim_jobs(repository: JobRepository, dataset: str, count: int) -> list[str]:
    ids = []
    for index in range(count):
        job = new_job(job_id=f"{index:024x}", dataset=dataset, created_at=f"2025-01-15T10:00:0{index}.000Z")
        ids.append(repository.claim(job).job.job_id)
    return ids


def test_given_five_jobs_when_listed_two_per_page_then_all_newest_first_once(
    repository: JobRepository,
) -> None:
    ids = _claim_jobs(repository, "ds-a", 5)
    _claim_jobs(repository, "ds-b", 2)
    seen: list[str] = []
    token: str | None = None
    for _ in range(5):
        page, token = repository.list_by_dataset("ds-a", limit=2, next_token=token)
        seen.extend(job.job_id for job in page)
        if token is None:
            break
    assert seen == list(reversed(ids))


def test_given_jobs_of_two_datasets_when_all_are_listed_two_per_page_then_every_job_newest_first_once(
    repository: JobRepository,
) -> None:
    datasets = ["ds-a", "ds-b", "ds-a", "ds-c", "ds-b"]
    claimed = [
        repository.claim(new_job(job_id=f"{i:024x}", dataset=dataset, created_at=f"2025-01-15T10:00:0{i}Z"))
        for i, dataset in enumerate(datasets)
    ]
    seen: list[str] = []
    token: str | None = None
    for _ in range(5):
        page, token = repository.list_all(limit=2, next_token=token)
        seen.extend(job.job_id for job in page)
        if token is None:
            break
    assert seen == [claim.job.job_id for claim in reversed(claimed)]
    assert all(claim.created for claim in claimed)


def test_given_token_of_the_dataset_listing_when_listing_all_then_bad_request(
    repository: JobRepository,
) -> None:
    _claim_jobs(repository, "ds-a", 3)
    _, token = repository.list_by_dataset("ds-a", limit=1)
    assert token is not None
    with pytest.raises(LoraflowError) as raised:
        repository.list_all(next_token=token)
    assert raised.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "token",
    [
        "not base64 at all!",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(json.dumps({"job_id": "x"}).encode()).decode(),
    ],
)
def test_given_malformed_token_when_listing_then_bad_request(repository: JobRepository, token: str) -> None:
    with pytest.raises(LoraflowError) as raised:
        repository.list_by_dataset("ds-a", next_token=token)
    assert raised.value.code is ErrorCode.BAD_REQUEST


def test_given_token_from_another_dataset_when_listing_then_bad_request(repository: JobRepository) -> None:
    _claim_jobs(repository, "ds-a", 3)
    _, token = repository.list_by_dataset("ds-a", limit=1)
    assert token is not None
    with pytest.raises(LoraflowError) as raised:
        repository.list_by_dataset("ds-b", next_token=token)
    assert raised.value.code is ErrorCode.BAD_REQUEST


def test_given_raw_item_with_extra_attributes_when_read_then_job_still_loads(
    repository: JobRepository, jobs_table: Any
) -> None:
    job = repository.claim(new_job()).job
    jobs_table.update_item(
        Key={"job_id": job.job_id},
        UpdateExpression="SET future_field = :v",
        ExpressionAttributeValues={":v": "added by a newer version"},
    )
    assert repository.require(job.job_id) == job
