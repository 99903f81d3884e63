from __future__ import annotations

import json

from loraflow_shared.errors import ErrorCode, LoraflowError, Problem
from loraflow_training.failure import MAX_FAILURE_CHARS, failure_json, problem_for


def test_given_domain_error_when_described_then_its_code_path_and_message() -> None:
    problem = problem_for(LoraflowError(ErrorCode.UNREADABLE_IMAGE, "cannot decode", "10_a/x.png"))

    assert problem == Problem(code=ErrorCode.UNREADABLE_IMAGE, path="10_a/x.png", message="cannot decode")


def test_given_unexpected_error_when_described_then_training_failed_with_first_line_only() -> None:
    problem = problem_for(RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"))

    assert problem.code == ErrorCode.TRAINING_FAILED
    assert problem.message == "RuntimeError: CUDA out of memory."


def test_given_huge_message_when_written_then_valid_json_within_sagemaker_limit() -> None:
    problem = Problem(code=ErrorCode.TRAINING_FAILED, path="5_a/b.png", message='x"\\' * 2000)

    text = failure_json(problem)

    assert len(text) <= MAX_FAILURE_CHARS
    decoded = json.loads(text)
    assert decoded["code"] == "TRAINING_FAILED" and decoded["path"] == "5_a/b.png"
    assert decoded["message"].endswith("…")
