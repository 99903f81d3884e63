"""Pipeline steps and attempts: capacity retries (`plan_training_retry`), steps of an attempt the job has
moved on from, and a `fail` that arrives after the job was cancelled."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from functions_aws import ARTIFACTS_BUCKET, REGION, Cloud, FakeLambdaContext, load_event
from loraflow_pipeline.logic import PipelineTasks
from loraflow_shared.errors import ErrorCode
from loraflow_shared.jobs.control import JobControl, cancelled_by_user
from loraflow_shared.jobs.control_aws import build_control
from loraflow_shared.jobs.model import Job, JobStatus, timestamp
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier
from pipeline_kit import JOB_ID, job_in, model_archive, record_payload, run, step

FIRST_NAME = f"loraflow-{JOB_ID}-1-1"
STANDARD = "ml.g5.2xlarge"  # TRAINING_INSTANCE_TYPE of the test environment
QUOTA_FULL = {
    "Error": "SageMaker.ResourceLimitExceededException",
    "Cause": "The account-level service limit 'ml.g5.2xlarge for training job usage' is 1 Instances, "
    "with current utilization of 1 Instances and a request delta of 1 Instances. (Service: AmazonSageMaker; "
    "Status Code: 400; Error Code: ResourceLimitExceeded; Request ID: 1f2e)",
}
ALGORITHM_ERROR = load_event("sfn_fail_training.json")["error"]  # the container's JSON in FailureReason
LORA = f"s3://{ARTIFACTS_BUCKET}/jobs/{JOB_ID}/lora/pytorch_lora_weights.safetensors"
PREVIEWS = {"job_id": JOB_ID, "previews": [{"prompt": "zqxj dog", "s3_uri": "s3://a/p/0.png"}]}


def _service_error(code: str) -> dict[str, str]:
    """How the optimised integration names a refused CreateTrainingJob."""
    cause = (
        f"Request refused. (Service: AmazonSageMaker; Status Code: 400; Error Code: {code}; Request ID: 9a)"
    )
    return {"Error": "SageMaker.AmazonSageMakerException", "Cause": cause}


def _described_training_job(**fields: Any) -> dict[str, str]:
    """A `.sync` task failure: States.TaskFailed with DescribeTrainingJob as the cause."""
    return {"Error": "States.TaskFailed", "Cause": json.dumps({"TrainingJobName": FIRST_NAME, **fields})}


@pytest.fixture
def control(cloud: Cloud, repository: JobRepository) -> JobControl:
    clients = {name: boto3.client(name, region_name=REGION) for name in ("stepfunctions", "sagemaker", "s3")}
    notifier = Notifier(boto3.client("sns", region_name=REGION), cloud.topic_arn)
    return build_control(repository, notifier, clients, cloud.state_machine_arn, ARTIFACTS_BUCKET)


def _started(seconds_ago: float = 0) -> str:
    """`$$.Execution.StartTime` as Step Functions writes it."""
    return timestamp(datetime.now(UTC) - timedelta(seconds=seconds_ago))


def _plan(error: dict[str, str], started_at: str | None = None) -> dict[str, Any]:
    return step("plan_training_retry", error=error, execution_started_at=started_at or _started())


def _scheduling(result: dict[str, Any]) -> dict[str, Any]:
    """plan_training_retry's decision (its base model inputs: test_pipeline_base_model)."""
    return {key: result[key] for key in ("retry", "wait_seconds", "training_job_name", "instance_type")}


def _training(tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext) -> Job:
    """A job whose first training job was submitted (mark_training named it)."""
    job_in(repository, JobStatus.QUEUED)
    run(tasks, context, step("mark_training"))
    return repository.require(JOB_ID)


def test_given_quota_full_when_retry_planned_then_wait_60s_under_a_new_name_recorded_on_the_attempt(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    _training(tasks, repository, context)

    result = run(tasks, context, _plan(QUOTA_FULL))

    assert _scheduling(result) == {
        "retry": True,
        "wait_seconds": 60,
        "training_job_name": f"loraflow-{JOB_ID}-1-2",
        "instance_type": STANDARD,
    }
    job = repository.require(JOB_ID)
    [attempt] = job.attempts
    assert attempt.training_job_names == [FIRST_NAME, f"loraflow-{JOB_ID}-1-2"]
    assert attempt.capacity_retries == 1
    assert attempt.waiting_reason is not None
    assert attempt.waiting_reason.startswith("SageMaker.ResourceLimitExceededException: ")
    assert "service limit" in attempt.waiting_reason
    assert job.status is JobStatus.TRAINING


def test_given_second_capacity_failure_when_retry_planned_then_wait_doubles_and_third_name(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    _training(tasks, repository, context)
    run(tasks, context, _plan(QUOTA_FULL))

    result = run(tasks, context, _plan(QUOTA_FULL))

    assert _scheduling(result) == {
        "retry": True,
        "wait_seconds": 120,
        "training_job_name": f"loraflow-{JOB_ID}-1-3",
        "instance_type": STANDARD,
    }
    [attempt] = repository.require(JOB_ID).attempts
    assert attempt.training_job_names == [FIRST_NAME] + [f"loraflow-{JOB_ID}-1-{n}" for n in (2, 3)]
    assert attempt.capacity_retries == 2


@pytest.mark.parametrize(
    ("error", "reason_part"),
    [
        (_service_error("ResourceLimitExceeded"), "ResourceLimitExceeded"),
        (
            _described_training_job(TrainingJobStatus="Failed", FailureReason="CapacityError: no ml.g5"),
            "no ml.g5",
        ),
        (
            _described_training_job(TrainingJobStatus="Stopped", SecondaryStatus="MaxWaitTimeExceeded"),
            "MaxWaitTimeExceeded",
        ),
    ],
    ids=["service-exception-quota", "capacity-error", "spot-wait-exceeded"],
)
def test_given_other_capacity_signals_when_retry_planned_then_retried_with_the_reason(
    tasks: PipelineTasks,
    repository: JobRepository,
    context: FakeLambdaContext,
    error: dict[str, str],
    reason_part: str,
) -> None:
    _training(tasks, repository, context)

    result = run(tasks, context, _plan(error))

    assert (result["retry"], result["wait_seconds"]) == (True, 60)
    [attempt] = repository.require(JOB_ID).attempts
    assert attempt.waiting_reason is not None and reason_part in attempt.waiting_reason


@pytest.mark.parametrize(
    "error",
    [
        ALGORITHM_ERROR,
        _service_error("ValidationException"),
        {"Error": "States.Timeout", "Cause": ""},
        {"Error": "TRAINING_FAILED", "Cause": None},
    ],
    ids=["algorithm-error", "service-exception-validation", "timeout", "no-cause"],
)
def test_given_failure_that_is_not_capacity_when_retry_planned_then_no_retry_and_job_unchanged(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext, error: dict[str, Any]
) -> None:
    before = _training(tasks, repository, context)

    result = run(tasks, context, _plan(error))

    assert _scheduling(result) == {
        "retry": False,
        "wait_seconds": 0,
        "training_job_name": FIRST_NAME,
        "instance_type": STANDARD,
    }
    assert repository.require(JOB_ID) == before


def test_given_attempt_waited_past_capacity_window_when_retry_planned_then_gives_up(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    before = _training(tasks, repository, context)

    result = run(tasks, context, _plan(QUOTA_FULL, started_at=_started(seconds_ago=2 * 3600)))

    assert _scheduling(result) == {
        "retry": False,
        "wait_seconds": 0,
        "training_job_name": FIRST_NAME,
        "instance_type": STANDARD,
    }
    assert repository.require(JOB_ID) == before


def test_given_wait_would_end_just_past_the_window_when_retry_planned_then_gives_up(
    tasks: PipelineTasks, repository: JobRepository, context: FakeLambdaContext
) -> None:
    _training(tasks, repository, context)

    # 3550 s waited + the 60 s wait > CAPACITY_WAIT_SECONDS (3600); 3500 s + 60 s fits.
    late = run(tasks, context, _plan(QUOTA_FULL, started_at=_started(seconds_ago=3550)))
    in_time = run(tasks, context, _plan(QUOTA_FULL, started_at=_started(seconds_ago=3500)))

    assert (late["retry"], in_time["retry"]) == (False, True)


_RENDERING = [JobStatus.TRAINING, JobStatus.GENERATING_PREVIEWS]


def _retried(control: JobControl, repository: JobRepository, cloud: Cloud, status: JobStatus) -> Job:
    """Attempt 1 trained, was cancelled and retried: the job runs attempt 2, now in `status`."""
    job_in(repository, JobStatus.TRAINING)
    control.cancel(JOB_ID, cancelled_by_user())
    control.retry(JOB_ID)
    path = {JobStatus.TRAINING: [JobStatus.TRAINING], JobStatus.GENERATING_PREVIEWS: _RENDERING}
    for later in path.get(status, []):
        repository.transition(JOB_ID, later, if_attempt=2)
    cloud.notifications()  # attempt 1's CANCELLED notification
    job = repository.require(JOB_ID)
    assert (job.attempt, job.status) == (2, status)
    return job


def _late_step(name: str) -> tuple[JobStatus, dict[str, Any]]:
    """A step of attempt 1, and the status attempt 2 is in when it arrives."""
    if name == "record_training":
        archive = model_archive(
            {
                "pytorch_lora_weights.safetensors": b"lora",
                "training_report.json": b'{"steps": 1, "final_loss": 0.5, "seconds": 1}',
            }
        )
        return JobStatus.TRAINING, record_payload(archive)
    return {
        "mark_training": (JobStatus.QUEUED, step("mark_training")),
        "plan_training_retry": (JobStatus.TRAINING, _plan(QUOTA_FULL)),
        "request_previews": (
            JobStatus.TRAINING,
            step("request_previews", task_token="late-token", lora_s3_uri=LORA),
        ),
        "complete": (JobStatus.GENERATING_PREVIEWS, step("complete", previews=PREVIEWS)),
    }[name]


def _artifact_keys() -> set[str]:
    listed = boto3.client("s3", region_name=REGION).list_objects_v2(Bucket=ARTIFACTS_BUCKET)
    return {item["Key"] for item in listed.get("Contents", [])}


@pytest.mark.parametrize(
    "name", ["mark_training", "plan_training_retry", "record_training", "request_previews", "complete"]
)
def test_given_job_runs_attempt_2_when_a_step_of_attempt_1_arrives_then_internal_error_and_nothing_changes(
    tasks: PipelineTasks,
    repository: JobRepository,
    control: JobControl,
    cloud: Cloud,
    context: FakeLambdaContext,
    name: str,
) -> None:
    status, payload = _late_step(name)
    before = _retried(control, repository, cloud, status)
    keys_before = _artifact_keys()

    with pytest.raises(Exception) as raised:
        run(tasks, context, payload)

    assert type(raised.value).__name__ == "INTERNAL_ERROR"
    assert "attempt 2" in json.loads(str(raised.value))["message"]
    assert repository.require(JOB_ID) == before
    assert _artifact_keys() == keys_before  # no LoRA copied, no preview request written
    assert cloud.notifications() == []


def test_given_job_runs_attempt_2_when_attempt_1_fails_late_then_attempt_2_untouched_and_nothing_announced(
    tasks: PipelineTasks,
    repository: JobRepository,
    control: JobControl,
    cloud: Cloud,
    context: FakeLambdaContext,
) -> None:
    before = _retried(control, repository, cloud, JobStatus.TRAINING)

    result = run(tasks, context, step("fail", error=ALGORITHM_ERROR))

    # How attempt 1 ended: its execution ends in the quiet Cancelled state, not as a failure (no alarm).
    assert result == {"status": "CANCELLED"}
    assert repository.require(JOB_ID) == before
    assert cloud.notifications() == []


def test_given_job_cancelled_while_training_when_its_failure_arrives_then_stays_cancelled_and_says_so(
    tasks: PipelineTasks,
    repository: JobRepository,
    control: JobControl,
    cloud: Cloud,
    context: FakeLambdaContext,
) -> None:
    job_in(repository, JobStatus.TRAINING)
    control.cancel(JOB_ID, cancelled_by_user())
    [cancelled_notice] = cloud.notifications()
    before = repository.require(JOB_ID)

    result = run(tasks, context, step("fail", error=ALGORITHM_ERROR))

    assert result == {"status": "CANCELLED"}  # the state machine then ends without failing
    job = repository.require(JOB_ID)
    assert job == before
    assert [p.code for p in job.errors] == [ErrorCode.CANCELLED]
    assert json.loads(cancelled_notice["Message"])["status"] == "CANCELLED"
    assert cloud.notifications() == []  # announced once, by the cancel
