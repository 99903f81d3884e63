"""The training pipeline ASL: JSONPath only, wired by DefinitionSubstitutions, every failure marks the job."""

from __future__ import annotations

import re
from typing import Any

import pytest
from loraflow_shared.contracts import ExecutionInput
from template_helpers import ASL_SUBSTITUTION, substitute

LAMBDA_INVOKE = "arn:aws:states:::lambda:invoke"
# AWS's recommended set for Lambda tasks (Step Functions "Handle Lambda service exceptions"), plus
# throttling of the invoke itself.
LAMBDA_TRANSIENT_ERRORS = {
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.ClientExecutionTimeoutException",
    "Lambda.TooManyRequestsException",
}
# What a training submission that lacked capacity, quota or API rate fails with (jobs.capacity).
CAPACITY_ERRORS = {
    "SageMaker.ResourceLimitExceededException",
    "SageMaker.AmazonSageMakerException",
    "ThrottlingException",
    "States.TaskFailed",
}
# Error names Step Functions can actually raise for these tasks (a misspelt name never matches).
KNOWN_ERROR_NAMES = (
    LAMBDA_TRANSIENT_ERRORS
    | CAPACITY_ERRORS
    | {"States.ALL", "States.Timeout", "States.HeartbeatTimeout", "States.Permissions"}
)
# Paths the pipeline writes into its state (ResultPath); everything else must come from the input.
WRITTEN_PATHS = {"settings", "run", "training", "recorded", "previews", "error", "outcome"}
# The states that run no task: they cannot fail except on their own intrinsic functions and paths.
CONTROL_STATES = {
    "Settings",
    "SpotOrOnDemand",
    "SpotStoppingCondition",
    "RetryOrFail",
    "WaitForCapacity",
    "FailedOrCancelled",
}


def _tasks(asl: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: state for name, state in asl["States"].items() if state["Type"] == "Task"}


def _json_paths(node: Any) -> list[str]:
    """Every `$.…` path referenced by a `key.$` field, including inside intrinsic functions."""
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            if key.endswith(".$") and isinstance(value, str):
                found += re.findall(r"(?<!\$)\$\.[A-Za-z_][\w.]*", value)
            found += _json_paths(value)
        return found
    if isinstance(node, list):
        return [path for item in node for path in _json_paths(item)]
    return []


def _transitions(state: dict[str, Any]) -> set[str]:
    targets = {state["Next"]} if "Next" in state else set()
    targets |= {catcher["Next"] for catcher in state.get("Catch", [])}
    targets |= {choice["Next"] for choice in state.get("Choices", [])}
    return targets | ({state["Default"]} if "Default" in state else set())


def _happy_path(asl: dict[str, Any], spot: bool) -> list[str]:
    """States visited when nothing fails, with spot training on or off (the one Choice)."""
    path, name = [], asl["StartAt"]
    while name is not None:
        path.append(name)
        state = asl["States"][name]
        if state["Type"] == "Choice":
            spot_rules = [c for c in state["Choices"] if c.get("Variable") == "$.settings.spot"]
            assert [c["BooleanEquals"] for c in spot_rules] == [True], name
            name = spot_rules[0]["Next"] if spot else state["Default"]
        else:
            name = state.get("Next")
    return path


def test_given_asl_file_when_parsed_then_json_with_jsonpath_only(asl_text: str, asl: dict[str, Any]) -> None:
    assert asl["States"]
    assert "JSONata" not in asl_text
    assert "{%" not in asl_text  # JSONata expression delimiters
    assert asl.get("QueryLanguage", "JSONPath") == "JSONPath"
    assert all(s.get("QueryLanguage", "JSONPath") == "JSONPath" for s in asl["States"].values())


def test_given_asl_and_template_when_substitutions_compared_then_same_names(
    asl_text: str, transformed: dict[str, Any]
) -> None:
    state_machine = transformed["Resources"]["TrainingPipeline"]["Properties"]

    assert set(ASL_SUBSTITUTION.findall(asl_text)) == set(state_machine["DefinitionSubstitutions"])


def test_given_substituted_asl_when_parsed_then_valid_json_with_numeric_training_limits(
    asl_text: str,
) -> None:
    values = {name: f"value-of-{name}" for name in ASL_SUBSTITUTION.findall(asl_text)}
    values.update(
        TrainingVolumeSizeGB="50",
        MaxTrainingSeconds="14400",
        UseSpotTraining="true",
        PreviewTimeoutSeconds="3600",
    )

    definition = substitute(asl_text, values)
    train = definition["States"]["Train"]["Parameters"]
    settings = definition["States"]["Settings"]["Parameters"]

    assert train["ResourceConfig"]["VolumeSizeInGB.$"] == "States.StringToJson('50')"
    assert settings["stopping_condition"]["MaxRuntimeInSeconds.$"] == "States.StringToJson('14400')"
    assert settings["spot.$"] == "States.StringToJson('true')"
    assert settings["preview_timeout_s.$"] == "States.StringToJson('3600')"


def test_given_asl_when_transitions_followed_then_every_target_exists_and_every_state_is_reachable(
    asl: dict[str, Any],
) -> None:
    states = asl["States"]
    targets = {asl["StartAt"]}
    for state in states.values():
        targets |= _transitions(state)

    assert targets == set(states)


@pytest.mark.parametrize("spot", [True, False])
def test_given_asl_when_nothing_fails_then_steps_run_in_contract_order(
    asl: dict[str, Any], spot: bool
) -> None:
    steps = _happy_path(asl, spot)
    actions = [
        asl["States"][name]["Parameters"]["Payload"]["action"]
        for name in steps
        if asl["States"][name].get("Resource", "").startswith(LAMBDA_INVOKE)
    ]
    capacity = ["SpotOrOnDemand"] + (["SpotStoppingCondition"] if spot else [])

    assert steps == [
        "Settings",
        "MarkTraining",
        *capacity,
        "Train",
        "RecordTraining",
        "GeneratePreviews",
        "Complete",
        "Succeeded",
    ]
    assert actions == ["mark_training", "record_training", "request_previews", "complete"]
    assert asl["States"]["Succeeded"]["Type"] == "Succeed"


def test_given_states_that_cannot_catch_when_listed_then_only_the_control_states(
    asl: dict[str, Any],
) -> None:
    # Pass, Choice and Wait states have no Catch: only these may sit outside the MarkFailed safety net,
    # and they run nothing but intrinsic functions over template parameters and task results.
    uncaught = {name for name, s in asl["States"].items() if s["Type"] in ("Pass", "Choice", "Wait")}

    assert uncaught == CONTROL_STATES


def test_given_any_task_except_mark_failed_when_it_fails_then_caught_into_mark_failed(
    asl: dict[str, Any],
) -> None:
    for name, state in _tasks(asl).items():
        if name == "MarkFailed":
            continue
        assert state["Catch"][-1] == {
            "ErrorEquals": ["States.ALL"],
            "ResultPath": "$.error",
            "Next": "MarkFailed",
        }, name
        assert len(state["Catch"]) == (2 if name == "Train" else 1), name


def test_given_training_submission_fails_when_caught_then_capacity_loop_back_to_train_or_mark_failed(
    asl: dict[str, Any],
) -> None:
    states = asl["States"]
    capacity_catch = states["Train"]["Catch"][0]
    plan = states[capacity_catch["Next"]]
    choice = states[plan["Next"]]
    [retry_rule] = choice["Choices"]
    wait = states[retry_rule["Next"]]

    assert set(capacity_catch["ErrorEquals"]) == CAPACITY_ERRORS
    assert capacity_catch["ResultPath"] == "$.error"  # MarkFailed reads it when the plan gives up
    assert plan["Parameters"]["Payload"]["action"] == "plan_training_retry"
    assert plan["Parameters"]["Payload"]["execution_started_at.$"] == "$$.Execution.StartTime"
    assert plan["ResultPath"] == "$.run"  # the next submission's name replaces the failed one's
    assert (retry_rule["Variable"], retry_rule["BooleanEquals"]) == ("$.run.retry", True)
    assert choice["Default"] == "MarkFailed"
    assert (wait["Type"], wait["SecondsPath"], wait["Next"]) == ("Wait", "$.run.wait_seconds", "Train")
    assert states["Train"]["Parameters"]["TrainingJobName.$"] == "$.run.training_job_name"


def test_given_mark_failed_when_it_succeeds_or_fails_then_execution_ends_in_fail_state(
    asl: dict[str, Any],
) -> None:
    states = asl["States"]
    mark_failed = states["MarkFailed"]
    outcome = states[mark_failed["Next"]]
    [cancelled_rule] = outcome["Choices"]
    failed = states[outcome["Default"]]

    assert mark_failed["Parameters"]["Payload"] == {
        "action": "fail",
        "job_id.$": "$.job_id",
        "attempt.$": "$.attempt",
        "error.$": "$.error",
    }
    assert [c["Next"] for c in mark_failed["Catch"]] == [outcome["Default"]]
    # Its own error must not overwrite the original reason.
    assert all(c["ResultPath"] != "$.error" for c in mark_failed["Catch"])
    assert failed["Type"] == "Fail"
    assert failed["Error"]
    assert failed["Cause"]
    # A job cancelled while a step was in flight ends the execution without failing it (no alarm).
    assert (cancelled_rule["Variable"], cancelled_rule["StringEquals"]) == ("$.outcome.status", "CANCELLED")
    assert states[cancelled_rule["Next"]]["Type"] == "Succeed"


def test_given_lambda_tasks_when_retried_then_on_transient_lambda_errors_as_aws_recommends(
    asl: dict[str, Any],
) -> None:
    for name, state in _tasks(asl).items():
        retried = {error for retry in state.get("Retry", []) for error in retry["ErrorEquals"]}
        if state["Resource"].startswith(LAMBDA_INVOKE):
            assert retried == LAMBDA_TRANSIENT_ERRORS, name
            assert all((r["MaxAttempts"], r["BackoffRate"]) == (6, 2) for r in state["Retry"]), name
        else:
            # A training job cannot be retried in place: a new submission needs a new name (the loop).
            assert retried == set(), name


def test_given_retry_and_catch_when_error_names_listed_then_all_exist(asl: dict[str, Any]) -> None:
    named = {
        error
        for state in asl["States"].values()
        for handler in state.get("Retry", []) + state.get("Catch", [])
        for error in handler["ErrorEquals"]
    }

    assert named <= KNOWN_ERROR_NAMES


def test_given_asl_when_state_paths_read_then_only_execution_input_or_written_results(
    asl: dict[str, Any],
) -> None:
    # Parameters read the state; ResultSelector reads the task's own result, so it is left out.
    parameters = [state.get("Parameters", {}) for state in asl["States"].values()]
    roots = {path.split(".")[1] for path in _json_paths(parameters)}

    assert roots <= set(ExecutionInput.model_fields) | WRITTEN_PATHS
    # The dataset, its URI and the base model as named are for people reading the execution's input:
    # the pipeline function reads the job's own record (the base model pinned, its channels).
    assert set(ExecutionInput.model_fields) - {"dataset", "dataset_s3_uri", "base_model"} <= roots


def test_given_training_step_when_configured_then_dataset_channel_and_contract_hyperparameters(
    asl: dict[str, Any],
) -> None:
    train = asl["States"]["Train"]
    parameters = train["Parameters"]

    assert train["Resource"] == "arn:aws:states:::sagemaker:createTrainingJob.sync"
    # The dataset channel, and a mirrored base model's: what mark_training / plan_training_retry return.
    assert parameters["InputDataConfig.$"] == "$.run.channels"
    assert parameters["HyperParameters"] == {
        "config_file.$": "$.config_file",
        "base_model.$": "$.run.base_model",
        "base_model_mirror.$": "$.run.base_model_mirror",
        "job_id.$": "$.job_id",
    }
    assert parameters["EnableManagedSpotTraining.$"] == "$.settings.spot"
    assert parameters["StoppingCondition.$"] == "$.settings.stopping_condition"
    assert parameters["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    # The whole DescribeTrainingJob output: record_training reads the billed seconds from it, and
    # no JSONPath into an optional field can fail the state.
    assert "ResultSelector" not in train
    assert train["ResultPath"] == "$.training"
    assert asl["States"]["RecordTraining"]["Parameters"]["Payload"]["training_job.$"] == "$.training"


def test_given_preview_step_when_waiting_then_passes_task_token_and_times_out(asl: dict[str, Any]) -> None:
    previews = asl["States"]["GeneratePreviews"]

    assert previews["Resource"] == "arn:aws:states:::lambda:invoke.waitForTaskToken"
    assert previews["Parameters"]["Payload"]["task_token.$"] == "$$.Task.Token"
    # The PreviewTimeoutSeconds parameter, which the async request's TTL and timeout are derived from.
    assert previews["TimeoutSecondsPath"] == "$.settings.preview_timeout_s"
    assert "TimeoutSeconds" not in previews
    assert previews["ResultPath"] == "$.previews"


def test_given_every_lambda_step_when_its_payload_read_then_it_names_the_attempt(asl: dict[str, Any]) -> None:
    for name, state in _tasks(asl).items():
        if state["Resource"].startswith(LAMBDA_INVOKE):
            assert state["Parameters"]["Payload"]["attempt.$"] == "$.attempt", name
