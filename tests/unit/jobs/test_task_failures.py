from __future__ import annotations

import json
from pathlib import Path

import pytest
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem
from loraflow_shared.jobs.failures import problems_from_task_failure, task_error

EVENTS = Path(__file__).resolve().parents[3] / "events"


def _lambda_cause(exc: BaseException) -> str:
    """What Step Functions stores as Cause for a Python Lambda that raised `exc`."""
    return json.dumps({"errorMessage": str(exc), "errorType": type(exc).__name__, "stackTrace": ["..."]})


def test_given_failed_training_job_cause_when_parsed_then_container_problem_recovered() -> None:
    error = json.loads((EVENTS / "sfn_fail_training.json").read_text())["error"]
    problems = problems_from_task_failure(error["Error"], error["Cause"], ErrorCode.TRAINING_FAILED)
    assert problems == [
        Problem(
            code=ErrorCode.UNREADABLE_IMAGE,
            path="20_zqxj dog/img 3.png",
            message="cannot decode image: image file is truncated (18 bytes not processed)",
        )
    ]


def test_given_failure_reason_cut_short_when_parsed_then_code_path_and_message_salvaged() -> None:
    reason = (
        'AlgorithmError: {"code": "MODEL_LOAD_FAILED", "path": "", '
        '"message": "cannot load base model \'x\': no'
    )
    cause = json.dumps({"TrainingJobStatus": "Failed", "FailureReason": reason})
    [problem] = problems_from_task_failure("States.TaskFailed", cause, ErrorCode.TRAINING_FAILED)
    assert problem.code is ErrorCode.MODEL_LOAD_FAILED
    assert problem.message.startswith("cannot load base model 'x': no")
    assert problem.message.endswith("[truncated]")


def test_given_failure_reason_without_json_when_parsed_then_fallback_code_keeps_text() -> None:
    cause = json.dumps({"FailureReason": "CapacityError: Unable to provision requested ML compute capacity."})
    [problem] = problems_from_task_failure("States.TaskFailed", cause, ErrorCode.TRAINING_FAILED)
    assert problem == Problem(
        code=ErrorCode.TRAINING_FAILED,
        path="",
        message="CapacityError: Unable to provision requested ML compute capacity.",
    )


def test_given_domain_error_raised_by_a_step_when_caught_and_parsed_then_same_problem() -> None:
    original = LoraflowError(ErrorCode.TRAINING_FAILED, "model.tar.gz has no LoRA", path="")
    raised = task_error(original)
    assert type(raised).__name__ == "TRAINING_FAILED"  # the error name Step Functions shows and catches
    problems = problems_from_task_failure(
        type(raised).__name__, _lambda_cause(raised), ErrorCode.INTERNAL_ERROR
    )
    assert problems == [original.to_problem()]


def test_given_unexpected_python_error_in_a_step_when_parsed_then_fallback_code_names_the_type() -> None:
    cause = _lambda_cause(KeyError("lora_s3_uri"))
    [problem] = problems_from_task_failure("KeyError", cause, ErrorCode.TRAINING_FAILED)
    assert problem.code is ErrorCode.TRAINING_FAILED
    assert problem.message == "KeyError: 'lora_s3_uri'"


def test_given_preview_failure_with_server_json_when_parsed_then_server_code_kept() -> None:
    cause = json.dumps({"code": "MODEL_LOAD_FAILED", "message": "cannot load base model 'y'"})
    [problem] = problems_from_task_failure("PREVIEW_FAILED", cause, ErrorCode.INTERNAL_ERROR)
    assert problem.code is ErrorCode.MODEL_LOAD_FAILED


def test_given_preview_failure_with_plain_reason_when_parsed_then_preview_failed() -> None:
    cause = "ClientError: Received server error (500) from model."
    [problem] = problems_from_task_failure("PREVIEW_FAILED", cause, ErrorCode.INTERNAL_ERROR)
    assert problem == Problem(code=ErrorCode.PREVIEW_FAILED, path="", message=cause)


def test_given_code_unknown_to_this_version_when_parsed_then_fallback_code_and_original_in_message() -> None:
    cause = json.dumps(
        {"FailureReason": json.dumps({"code": "GPU_ON_FIRE", "path": "", "message": "smoke seen"})}
    )
    [problem] = problems_from_task_failure("States.TaskFailed", cause, ErrorCode.TRAINING_FAILED)
    assert problem.code is ErrorCode.TRAINING_FAILED
    assert problem.message == "GPU_ON_FIRE: smoke seen"


@pytest.mark.parametrize("cause", ["", "   ", "{not json", "[1, 2, 3]", "null", '{"FailureReason": 5}'])
def test_given_unreadable_cause_when_parsed_then_one_problem_and_no_crash(cause: str) -> None:
    problems = problems_from_task_failure("States.Timeout", cause, ErrorCode.PREVIEW_FAILED)
    assert len(problems) == 1
    assert problems[0].code is ErrorCode.PREVIEW_FAILED
    assert problems[0].message
