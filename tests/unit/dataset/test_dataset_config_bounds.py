"""Config bounds: whatever validation accepts, every later consumer accepts too; anything else is one
INVALID_CONFIG naming the key, never a stack trace. (The trainer and renderer side of the seeds is in
tests/unit/containers/test_config_bounds_consumers.py.)"""

import importlib.util
import math
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from boto3.dynamodb.types import DYNAMODB_CONTEXT
from loraflow_shared.dataset.config import (
    MAX_CONFIG_PROBLEMS,
    MAX_IGNORED_KEY_WARNINGS,
    MAX_MODEL_REF_CHARS,
    MAX_SEED,
    ParsedConfig,
    TrainingConfig,
    ignored_key_warnings,
    parse_config,
)
from loraflow_shared.dataset.config_messages import MAX_SHOWN_CHARS
from loraflow_shared.dataset.config_rules import MAX_PREVIEW_SIDE
from loraflow_shared.dataset.layout import MAX_PREVIEW_PROMPTS
from loraflow_shared.errors import ErrorCode, Problem, ValidationFailed
from loraflow_shared.jobs.model import PreviewSettings, StatusChange
from loraflow_shared.jobs.repository import JobRepository

PATH = "config.toml"
LORAFLOW_KEYS = tuple(TrainingConfig.model_fields["loraflow"].annotation.model_fields)  # type: ignore[union-attr]


def toml(key: str, value: str, extra: str = "") -> str:
    """One key (top level or in [loraflow]) plus `extra` lines; previews kept small unless tested."""
    loraflow = [] if key == "preview_resolution" else ["preview_resolution = 512"]
    if key in LORAFLOW_KEYS:
        return f"{extra}[loraflow]\n" + "\n".join([f"{key} = {value}", *loraflow]) + "\n"
    return f"{key} = {value}\n{extra}[loraflow]\n" + "\n".join(loraflow) + "\n"


def parse(text: str) -> ParsedConfig:
    return parse_config(text.encode(), PATH)


def rejected(text: str) -> list[Problem]:
    """The problems of a config that must be rejected; any other exception fails the test."""
    with pytest.raises(ValidationFailed) as caught:
        parse(text)
    assert all(
        problem.code is ErrorCode.INVALID_CONFIG and problem.path == PATH for problem in caught.value.problems
    )
    return caught.value.problems


def schema_of(key: str) -> dict[str, Any]:
    root = TrainingConfig.model_json_schema()
    properties = (
        root["$defs"]["LoraflowSettings"]["properties"] if key in LORAFLOW_KEYS else root["properties"]
    )
    node = properties[key]
    return next((option for option in node.get("anyOf", []) if option.get("type") != "null"), node)


def bounded_numeric_keys() -> list[str]:
    keys = [*TrainingConfig.model_fields, *LORAFLOW_KEYS]
    return [key for key in keys if key not in ("loraflow", "resolution") and "maximum" in schema_of(key)]


# Keys whose largest value contradicts a default of another key: the companion setting that allows it.
COMPANIONS = {"min_bucket_reso": "max_bucket_reso = 4096\n"}


def name_of(key: str) -> str:
    return f"loraflow.{key}" if key in LORAFLOW_KEYS else key


# --- every bounded number at its edges


@pytest.mark.parametrize("key", bounded_numeric_keys())
def test_given_largest_value_of_a_key_when_parsed_then_accepted_and_just_above_rejected_naming_it(
    key: str,
) -> None:
    schema = schema_of(key)
    largest = schema["maximum"]
    above = (
        largest + schema.get("multipleOf", 1)
        if schema["type"] == "integer"
        else math.nextafter(largest, math.inf)
    )
    extra = COMPANIONS.get(key, "")

    accepted = parse(toml(key, repr(largest), extra)).config

    assert getattr(accepted.loraflow if key in LORAFLOW_KEYS else accepted, key) == largest
    problems = rejected(toml(key, repr(above), extra))
    assert [problem.message.split(":")[0] for problem in problems] == [name_of(key)]


def test_given_largest_resolution_when_parsed_then_accepted_with_previews_set_and_just_above_rejected() -> (
    None
):
    assert parse(toml("resolution", "4096")).config.resolution == (4096, 4096)
    assert [p.message.split(":")[0] for p in rejected(toml("resolution", '"4104,512"'))] == [
        "resolution (width)"
    ]


@pytest.mark.parametrize("key", [*bounded_numeric_keys(), "lr_warmup_steps"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "1e400", "-1e400"])
def test_given_non_finite_number_for_any_numeric_key_when_parsed_then_invalid_config_naming_it(
    key: str, value: str
) -> None:
    problems = rejected(toml(key, value, COMPANIONS.get(key, "")))

    assert [problem.message.split(":")[0] for problem in problems] == [name_of(key)]


@pytest.mark.parametrize("key", [*bounded_numeric_keys(), "lr_warmup_steps"])
def test_given_forty_digit_number_for_any_numeric_key_when_parsed_then_invalid_config_naming_it(
    key: str,
) -> None:
    problems = rejected(toml(key, "1" * 40))

    assert [problem.message.split(":")[0] for problem in problems] == [name_of(key)]
    assert len(problems[0].message) < 300


def test_given_float_key_when_finite_value_inside_bounds_then_accepted_exactly() -> None:
    assert parse(toml("learning_rate", "1e-300")).config.learning_rate == 1e-300


# --- seeds


@pytest.mark.parametrize("key", ["seed", "preview_seed"])
def test_given_seed_when_largest_then_accepted_and_one_more_rejected(key: str) -> None:
    parsed = parse(toml(key, str(MAX_SEED))).config

    assert (parsed.seed if key == "seed" else parsed.loraflow.preview_seed) == MAX_SEED
    assert rejected(toml(key, str(MAX_SEED + 1)))[0].message == (
        f"{name_of(key)}: must be between 0 and 4294967295, got {MAX_SEED + 1}"
    )


def test_given_largest_seed_when_python_and_numpy_seeded_then_both_accept_and_numpy_refuses_one_more() -> (
    None
):
    random.seed(MAX_SEED)
    np.random.seed(MAX_SEED)

    with pytest.raises(ValueError):
        np.random.seed(MAX_SEED + 1)  # the bound is numpy's: the trainer seeds numpy with `seed`


# --- strings


@pytest.mark.parametrize(
    ("key", "longest", "too_long"),
    [
        (
            "pretrained_model_name_or_path",
            "s3://" + "b" * 63 + "/" + "k" * 1024,
            "s3://" + "b" * 63 + "/" + "k" * 1025,
        ),
        ("caption_separator", "|" * 8, "|" * 9),
        ("output_name", "a" * 100, "a" * 101),
    ],
)
def test_given_string_key_when_longest_then_accepted_and_one_more_character_rejected_naming_it(
    key: str, longest: str, too_long: str
) -> None:
    assert getattr(parse(toml(key, f'"{longest}"')).config, key) == longest

    problems = rejected(toml(key, f'"{too_long}"'))

    assert [problem.message.split(":")[0] for problem in problems] == [key]
    assert len(problems[0].message) < 300  # the value is quoted cut short


def test_given_longest_s3_uri_when_measured_then_it_is_the_model_reference_bound() -> None:
    assert len("s3://" + "b" * 63 + "/" + "k" * 1024) == MAX_MODEL_REF_CHARS


def test_given_preview_prompts_when_longest_and_most_then_accepted_and_beyond_rejected() -> None:
    prompt = "p" * 1000
    most = "[" + ", ".join([f'"{prompt}"'] * MAX_PREVIEW_PROMPTS) + "]"

    assert (
        parse(toml("preview_prompts", most)).config.loraflow.preview_prompts == [prompt] * MAX_PREVIEW_PROMPTS
    )
    too_many = "[" + ", ".join(['"p"'] * (MAX_PREVIEW_PROMPTS + 1)) + "]"
    assert rejected(toml("preview_prompts", too_many))[0].message.startswith("loraflow.preview_prompts:")
    assert rejected(toml("preview_prompts", f'["{prompt}p"]'))[0].message.startswith(
        "loraflow.preview_prompts[0]:"
    )


# --- previews sized by the training resolution


def test_given_training_resolution_beyond_preview_side_when_no_preview_resolution_then_invalid_config() -> (
    None
):
    assert parse(f"resolution = {MAX_PREVIEW_SIDE}\n").config.preview_side == MAX_PREVIEW_SIDE
    assert parse('resolution = "3072,2048"\n').config.preview_side == MAX_PREVIEW_SIDE

    problems = rejected('resolution = "3072,2056"\n')

    assert problems[0].message.startswith("resolution: previews render at its shorter side")
    assert "set loraflow.preview_resolution, got 3072x2056" in problems[0].message
    assert (
        parse('resolution = "3072,2056"\n[loraflow]\npreview_resolution = 1024\n').config.preview_side == 1024
    )


# --- how many problems and how long: each lands in the job record


def test_given_thousands_of_unknown_loraflow_keys_when_parsed_then_problems_capped_with_a_count() -> None:
    keys = "".join(f"unknown_{index} = 1\n" for index in range(3000))

    problems = rejected(f"[loraflow]\n{keys}")

    assert len(problems) == MAX_CONFIG_PROBLEMS + 1
    assert problems[-1].message == f"and {3000 - MAX_CONFIG_PROBLEMS} more problems in the config"


def test_given_thousands_of_ignored_keys_when_warned_then_capped_with_a_count_and_long_names_cut() -> None:
    parsed = parse("k" * 5000 + " = 1\n" + "".join(f"kohya_key_{index} = 1\n" for index in range(3000)))

    warnings = ignored_key_warnings(parsed, PATH)

    assert len(parsed.ignored_keys) == 3001
    assert len(warnings) == MAX_IGNORED_KEY_WARNINGS + 1
    assert all(problem.code is ErrorCode.IGNORED_CONFIG_KEY for problem in warnings)
    assert (
        warnings[-1].message
        == f"and {3001 - MAX_IGNORED_KEY_WARNINGS} more keys not used by loraflow, ignored"
    )
    assert max(len(problem.message) for problem in warnings) <= MAX_SHOWN_CHARS + 40


def test_given_ignored_key_set_twice_differently_when_parsed_then_no_conflict_reported() -> None:
    parsed = parse("[a]\nxformers = true\n[b]\nxformers = false\n")

    assert parsed.ignored_keys == ["xformers"]


# --- the job record: the largest accepted values round-trip through DynamoDB


def load_jobs_aws() -> ModuleType:
    """The jobs tests' moto helper (the table as template.yaml declares it), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "jobs" / "jobs_aws.py"
    spec = importlib.util.spec_from_file_location("dataset_tests_jobs_aws", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def largest_preview_config() -> TrainingConfig:
    prompts = ", ".join(['"' + "\U0001f600" * 1000 + '"'] * MAX_PREVIEW_PROMPTS)  # 4 UTF-8 bytes each
    model = "s3://" + "b" * 63 + "/" + "k" * 1024
    text = (
        f'pretrained_model_name_or_path = "{model}"\nseed = {MAX_SEED}\nclip_skip = 12\n'
        f"[loraflow]\npreview_prompts = [{prompts}]\npreview_steps = 150\n"
        f"preview_resolution = {MAX_PREVIEW_SIDE}\npreview_seed = {MAX_SEED}\n"
    )
    return parse(text).config


def test_given_largest_accepted_values_when_written_to_the_jobs_table_then_read_back_unchanged(
    aws: None,
) -> None:
    jobs_aws = load_jobs_aws()
    repository = JobRepository(jobs_aws.create_jobs_table())
    config = largest_preview_config()
    preview = PreviewSettings(
        prompts=config.loraflow.preview_prompts or [],
        steps=config.loraflow.preview_steps,
        resolution=config.preview_side,
        seed=config.loraflow.preview_seed,
        clip_skip=config.clip_skip,
    )
    warnings = ignored_key_warnings(parse("".join(f"{'k' * 200}{i} = 1\n" for i in range(500))), PATH)
    job = jobs_aws.new_job().model_copy(
        update={"base_model": config.pretrained_model_name_or_path, "preview": preview, "warnings": warnings}
    )

    repository.claim(job)

    first = StatusChange(status=job.status, at=job.created_at)  # the timeline `claim` starts
    assert repository.get(job.job_id) == job.model_copy(update={"history": [first]})


def test_given_forty_digit_seed_when_written_to_the_jobs_table_then_dynamodb_refuses_it(aws: None) -> None:
    """Why seeds are bounded: DynamoDB numbers hold 38 significant digits (boto3 refuses more)."""
    assert DYNAMODB_CONTEXT.prec == 38
    jobs_aws = load_jobs_aws()
    repository = JobRepository(jobs_aws.create_jobs_table())
    preview = PreviewSettings(prompts=["p"], steps=1, resolution=64, seed=int("1" * 40))
    job = jobs_aws.new_job().model_copy(update={"preview": preview})

    with pytest.raises(Exception, match=r"Inexact|Rounded"):
        repository.claim(job)
