import pytest
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem, ValidationFailed, problems_of


def test_given_domain_error_when_converted_then_problem_keeps_code_path_and_message() -> None:
    error = LoraflowError(ErrorCode.BAD_CAPTION, "caption is empty", "60_dwjz/a.txt")

    problem = error.to_problem()

    assert problem == Problem(code=ErrorCode.BAD_CAPTION, path="60_dwjz/a.txt", message="caption is empty")
    assert "BAD_CAPTION" in str(error) and "60_dwjz/a.txt" in str(error)


def test_given_several_problems_when_validation_failed_then_all_are_kept_and_first_sets_the_code() -> None:
    problems = [
        Problem(code=ErrorCode.INVALID_CONFIG, path="c.toml", message="network_dim: bad"),
        Problem(code=ErrorCode.INVALID_CONFIG, path="c.toml", message="seed: bad"),
    ]

    error = ValidationFailed(problems)

    assert error.code is ErrorCode.INVALID_CONFIG
    assert error.path == "c.toml"
    assert "and 1 more" in error.message
    assert problems_of(error) == problems


def test_given_single_error_when_problems_listed_then_one_problem() -> None:
    error = LoraflowError(ErrorCode.JOB_NOT_FOUND, "no job abc")

    assert problems_of(error) == [Problem(code=ErrorCode.JOB_NOT_FOUND, path="", message="no job abc")]


def test_given_no_problems_when_validation_failed_built_then_refused() -> None:
    with pytest.raises(ValueError):
        ValidationFailed([])


def test_given_problem_when_serialised_then_code_is_plain_string() -> None:
    problem = Problem(code=ErrorCode.ORPHAN_CAPTION, path="60_a/x.txt", message="m")

    assert problem.model_dump(mode="json") == {"code": "ORPHAN_CAPTION", "path": "60_a/x.txt", "message": "m"}
    assert problem.is_warning
    assert not Problem(code=ErrorCode.UNSAFE_KEY, path="", message="m").is_warning
