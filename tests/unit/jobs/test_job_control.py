"""Job control's rules (cancel, retry, attempts) on a moto jobs table; the AWS calls it makes are
recorded by in-memory adapters behind its Protocols (their boto3 side: test_control_aws.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from jobs_aws import new_job
from loraflow_shared.contracts import ExecutionInput
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.jobs.control import JobControl, cancelled_by_user, superseded_by
from loraflow_shared.jobs.errors import JobStateConflict, StaleAttempt
from loraflow_shared.jobs.model import Attempt, Job, JobStatus, execution_name
from loraflow_shared.jobs.repository import JobRepository

JOB_ID = "a" * 24
VALIDATION_WARNING = Problem(code=ErrorCode.IGNORED_CONFIG_KEY, path="c.toml", message="xformers ignored")


@dataclass
class Recorder:
    """Every AWS call job control makes, in order."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def start(self, execution_input: ExecutionInput) -> str:
        self.calls.append(("start", execution_input))
        name = execution_name(execution_input.job_id, execution_input.attempt)
        return f"arn:aws:states:us-east-1:1:execution:sm:{name}"

    def stop(self, target: str, cause: str = "") -> None:
        self.calls.append(("stop", target))

    def cancel(self, inference: str) -> None:
        self.calls.append(("cancel_render", inference))

    def request(self, job: Job) -> None:
        self.calls.append(("revalidate", job.job_id))

    def publish_terminal(self, job: Job) -> None:
        self.calls.append(("notify", job.status))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def control(repository: JobRepository, recorder: Recorder) -> JobControl:
    return JobControl(repository, recorder, recorder, recorder, recorder, revalidation=recorder)


def _job_in(repository: JobRepository, control: JobControl, *path: JobStatus, **fields: Any) -> Job:
    job = repository.claim(new_job(JOB_ID)).job
    for status in path:
        extra: dict[str, Any] = {}
        if status is JobStatus.QUEUED:
            extra = {
                "config_file": "c.toml",
                "base_model": "m",
                "warnings": [VALIDATION_WARNING],
                "validation_warnings": [VALIDATION_WARNING],
                "attempts": [control.new_attempt(job, 1)],
            }
        job = repository.transition(JOB_ID, status, **extra)
    return repository.update(JOB_ID, **fields) if fields else job


def _trained(repository: JobRepository, control: JobControl, status: JobStatus) -> Job:
    job = _job_in(repository, control, JobStatus.QUEUED, JobStatus.TRAINING)
    names = [f"loraflow-{JOB_ID}-1-1", f"loraflow-{JOB_ID}-1-2"]
    attempt = job.attempts[0].model_copy(update={"execution_arn": "arn:exec-1", "training_job_names": names})
    job = repository.update(JOB_ID, attempts=[attempt], execution_arn="arn:exec-1")
    if status is not JobStatus.TRAINING:
        job = repository.transition(JOB_ID, status)
    return job


@pytest.mark.parametrize("status", [JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS])
def test_given_running_job_when_cancelled_then_cancelled_and_everything_it_runs_stopped_then_notified(
    repository: JobRepository, control: JobControl, recorder: Recorder, status: JobStatus
) -> None:
    _trained(repository, control, status)

    cancelled = control.cancel(JOB_ID, cancelled_by_user())

    assert cancelled.status is JobStatus.CANCELLED
    assert [p.code for p in cancelled.errors] == [ErrorCode.CANCELLED]
    assert (cancelled.attempts[0].status, cancelled.attempts[0].ended_at is not None) == (
        JobStatus.CANCELLED,
        True,
    )
    assert recorder.calls == [
        ("notify", JobStatus.CANCELLED),
        ("stop", "arn:exec-1"),
        ("stop", f"loraflow-{JOB_ID}-1-1"),
        ("stop", f"loraflow-{JOB_ID}-1-2"),
        ("cancel_render", f"{JOB_ID}-1"),
    ]
    assert repository.require(JOB_ID).notified_at is not None


def test_given_a_stop_fails_when_cancelled_then_the_others_still_run_and_the_job_stays_cancelled(
    repository: JobRepository, control: JobControl, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    _trained(repository, control, JobStatus.TRAINING)
    stop = recorder.stop

    def refusing_execution_stop(target: str, cause: str = "") -> None:
        if target.startswith("arn:"):
            raise RuntimeError("ThrottlingException")
        stop(target, cause)

    recorder.stop = refusing_execution_stop  # type: ignore[method-assign]

    cancelled = control.cancel(JOB_ID, cancelled_by_user())

    assert cancelled.status is JobStatus.CANCELLED and cancelled.notified_at is not None
    assert ("stop", f"loraflow-{JOB_ID}-1-2") in recorder.calls
    assert "stopping execution arn:exec-1 failed" in caplog.text


def test_given_validating_job_when_cancelled_then_cancelled_without_stopping_anything(
    repository: JobRepository, control: JobControl, recorder: Recorder
) -> None:
    _job_in(repository, control)

    control.cancel(JOB_ID, superseded_by(new_job("b" * 24)))

    job = repository.require(JOB_ID)
    assert job.status is JobStatus.CANCELLED
    assert job.errors[0].code is ErrorCode.SUPERSEDED and "b" * 24 in job.errors[0].message
    assert recorder.calls == [("notify", JobStatus.CANCELLED)]


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_given_ended_job_when_cancelled_then_conflict_and_nothing_touched(
    repository: JobRepository, control: JobControl, recorder: Recorder, status: JobStatus
) -> None:
    path = [JobStatus.QUEUED, JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS, status]
    _job_in(repository, control, *(path if status is JobStatus.COMPLETED else [*path[:1], status]))
    before = repository.require(JOB_ID)

    with pytest.raises(JobStateConflict) as raised:
        control.cancel(JOB_ID, cancelled_by_user())

    assert raised.value.code is ErrorCode.JOB_STATE_CONFLICT
    assert repository.require(JOB_ID) == before
    assert recorder.calls == []


def test_given_failed_job_when_retried_then_new_attempt_from_the_validated_dataset(
    repository: JobRepository, control: JobControl, recorder: Recorder
) -> None:
    _trained(repository, control, JobStatus.TRAINING)
    training_warning = Problem(code=ErrorCode.WEAK_LORA, path="", message="weak")
    repository.update(JOB_ID, warnings=[VALIDATION_WARNING, training_warning])
    repository.transition(
        JOB_ID, JobStatus.FAILED, errors=[Problem(code=ErrorCode.NAN_LOSS, path="", message="x")]
    )

    retried = control.retry(JOB_ID)

    assert (retried.status, retried.attempt) == (JobStatus.QUEUED, 2)
    assert (retried.errors, retried.warnings, retried.notified_at) == ([], [VALIDATION_WARNING], None)
    assert [a.number for a in retried.attempts] == [1, 2]
    assert retried.attempts[0].training_job_names  # the first attempt's record is kept
    assert retried.attempts[1].execution_arn == retried.execution_arn
    [(call, started)] = recorder.calls
    assert (call, started.attempt, started.job_id) == ("start", 2, JOB_ID)
    assert retried.execution_arn is not None and retried.execution_arn.endswith(f":{JOB_ID}-2")


def test_given_retried_job_when_a_step_of_the_first_attempt_writes_then_stale_and_unchanged(
    repository: JobRepository, control: JobControl
) -> None:
    _trained(repository, control, JobStatus.TRAINING)
    control.cancel(JOB_ID, cancelled_by_user())
    control.retry(JOB_ID)
    before = repository.require(JOB_ID)

    with pytest.raises(StaleAttempt):
        repository.transition(JOB_ID, JobStatus.TRAINING, if_attempt=1)
    with pytest.raises(StaleAttempt):
        repository.update(JOB_ID, if_attempt=1, training=None)

    assert repository.require(JOB_ID) == before


def test_given_job_failed_before_validation_ended_when_retried_then_validated_again(
    repository: JobRepository, control: JobControl, recorder: Recorder
) -> None:
    _job_in(repository, control, JobStatus.FAILED)

    retried = control.retry(JOB_ID)

    assert (retried.status, retried.attempt) == (JobStatus.VALIDATING, 2)
    assert recorder.calls == [("revalidate", JOB_ID)]


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.TRAINING])
def test_given_unfinished_job_when_retried_then_conflict(
    repository: JobRepository, control: JobControl, recorder: Recorder, status: JobStatus
) -> None:
    _trained(repository, control, JobStatus.TRAINING) if status is JobStatus.TRAINING else _job_in(
        repository, control, status
    )

    with pytest.raises(JobStateConflict, match="only FAILED or CANCELLED"):
        control.retry(JOB_ID)
    assert recorder.calls == []


def test_given_queued_job_when_started_twice_then_one_execution_recorded_on_the_attempt(
    repository: JobRepository, control: JobControl, recorder: Recorder
) -> None:
    job = _job_in(repository, control, JobStatus.QUEUED)

    first = control.start_attempt(job)
    second = control.start_attempt(first)

    assert first.execution_arn == second.execution_arn == second.attempts[0].execution_arn
    assert [call for call, _ in recorder.calls] == ["start", "start"]  # StartExecution is idempotent
    assert isinstance(second.attempts[0], Attempt)
