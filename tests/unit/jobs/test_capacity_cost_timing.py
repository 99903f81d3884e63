"""Which training failures wait for capacity, what a job cost, and how long previews may take."""

from __future__ import annotations

import json

import pytest
from loraflow_shared.dataset.preview_budget import PREVIEW_INVOCATION_TIMEOUT_S
from loraflow_shared.jobs.capacity import MAX_WAIT_S, capacity_reason, next_wait_seconds
from loraflow_shared.jobs.cost import (
    TrainingJobDescription,
    failed_training_cost,
    parse_price_table,
    total_cost,
    training_cost,
)
from loraflow_shared.jobs.preview_timing import (
    MAX_PREVIEW_TIMEOUT_S,
    MAX_REQUEST_TTL_S,
    MIN_PREVIEW_TIMEOUT_S,
    MIN_REQUEST_TTL_S,
    NOTIFICATION_MARGIN_S,
    preview_timeouts,
)


def _described(**fields: object) -> str:
    return json.dumps({"TrainingJobName": "loraflow-x-1-1", **fields})


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        ("SageMaker.ResourceLimitExceededException", "The account-level service limit is 1 Instances"),
        ("ThrottlingException", "Rate exceeded"),
        (
            "SageMaker.AmazonSageMakerException",
            "Limit exceeded (Service: AmazonSageMaker; Status Code: 400; Error Code: ResourceLimitExceeded; "
            "Request ID: 1)",
        ),
        (
            "States.TaskFailed",
            _described(TrainingJobStatus="Failed", FailureReason="CapacityError: Unable to provision"),
        ),
        (
            "States.TaskFailed",
            _described(TrainingJobStatus="Stopped", SecondaryStatus="MaxWaitTimeExceeded"),
        ),
    ],
)
def test_given_lack_of_capacity_or_quota_when_classified_then_a_reason_to_wait(
    error: str, cause: str
) -> None:
    reason = capacity_reason(error, cause)
    assert reason is not None and len(reason) <= 400


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            "SageMaker.AmazonSageMakerException",
            "bad (Service: AmazonSageMaker; Status Code: 400; Error Code: ValidationException)",
        ),
        (
            "States.TaskFailed",
            _described(TrainingJobStatus="Failed", FailureReason='AlgorithmError: {"code": "NAN_LOSS"}'),
        ),
        ("States.TaskFailed", _described(TrainingJobStatus="Stopped", SecondaryStatus="Stopped")),
        ("States.TaskFailed", "not json"),
        ("States.Timeout", ""),
        ("Lambda.Unknown", "CapacityError"),  # the text alone is not the signal
    ],
)
def test_given_a_real_failure_when_classified_then_no_waiting(error: str, cause: str) -> None:
    assert capacity_reason(error, cause) is None


def test_given_successive_retries_when_waiting_then_doubling_from_a_minute_up_to_fifteen() -> None:
    assert [next_wait_seconds(n) for n in range(6)] == [60, 120, 240, 480, 900, 900]
    assert next_wait_seconds(10_000) == MAX_WAIT_S


def test_given_spot_job_when_costed_then_billable_seconds_at_the_on_demand_price() -> None:
    description = TrainingJobDescription.model_validate_json(
        _described(
            ResourceConfig={"InstanceType": "ml.g5.12xlarge", "InstanceCount": 2},
            TrainingTimeInSeconds=3600,
            BillableTimeInSeconds=1800,
            EnableManagedSpotTraining=True,
        )
    )

    cost = training_cost(description, parse_price_table("ml.g5.12xlarge=7.09"))

    assert cost is not None
    assert (cost.training_seconds, cost.billable_seconds, cost.spot, cost.instance_count) == (
        3600,
        1800,
        True,
        2,
    )
    assert cost.estimated_usd == 7.09  # half an hour on two instances


def test_given_type_missing_from_the_price_table_when_costed_then_seconds_without_a_price() -> None:
    cost = failed_training_cost(
        _described(ResourceConfig={"InstanceType": "ml.p5.48xlarge"}, BillableTimeInSeconds=60), {}
    )
    assert cost is not None and (cost.price_per_hour_usd, cost.estimated_usd) == (None, None)


@pytest.mark.parametrize("cause", ["", "no json", '{"errorMessage": "x"}', _described()])
def test_given_failure_without_billed_time_when_costed_then_none(cause: str) -> None:
    assert failed_training_cost(cause, {"ml.g5.xlarge": 1.0}) is None


def test_given_attempts_when_total_cost_summed_then_known_estimates_only() -> None:
    cost = training_cost(
        TrainingJobDescription.model_validate_json(
            _described(ResourceConfig={"InstanceType": "ml.g5.xlarge"}, BillableTimeInSeconds=3600)
        ),
        {"ml.g5.xlarge": 1.408},
    )
    assert total_cost([cost, None, cost]) == 2.816
    assert total_cost([None]) is None


@pytest.mark.parametrize("total", [MIN_PREVIEW_TIMEOUT_S, 3600, MAX_PREVIEW_TIMEOUT_S])
def test_given_preview_timeout_when_split_then_request_fits_in_the_callback_wait(total: int) -> None:
    timeouts = preview_timeouts(total)

    assert timeouts.invocation_s == PREVIEW_INVOCATION_TIMEOUT_S <= 3600  # AWS's maximum
    assert MIN_REQUEST_TTL_S <= timeouts.request_ttl_s <= MAX_REQUEST_TTL_S
    assert timeouts.request_ttl_s + timeouts.invocation_s + NOTIFICATION_MARGIN_S == total


@pytest.mark.parametrize("total", [MIN_PREVIEW_TIMEOUT_S - 1, MAX_PREVIEW_TIMEOUT_S + 1])
def test_given_preview_timeout_outside_what_fits_when_split_then_refused(total: int) -> None:
    with pytest.raises(ValueError, match="preview timeout"):
        preview_timeouts(total)
