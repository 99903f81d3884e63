"""Which loraflow a client command talks to: command line, then LORAFLOW_TARGET, then the saved default."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from cfnlint.decode import decode
from loraflow_local.targets import (
    API_KEY_OUTPUT,
    API_URL_OUTPUT,
    DATASET_BUCKET_OUTPUT,
    DEFAULT_STATE_DIR,
    Target,
    TargetError,
    choose_target,
    parse_target,
    resolve,
    save_target,
)


@pytest.fixture(autouse=True)
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("LORAFLOW_TARGET", raising=False)
    return tmp_path / "config"


def test_given_specs_when_parsed_then_local_dir_or_stack_with_optional_region() -> None:
    assert parse_target("local:/tmp/state") == Target("local", "/tmp/state")
    assert parse_target("stack:prod@eu-west-1") == Target("stack", "prod", "eu-west-1")
    assert parse_target("stack:prod") == Target("stack", "prod", None)
    with pytest.raises(TargetError, match="neither local:STATE_DIR nor stack:NAME"):
        parse_target("prod")


def test_given_nothing_chosen_when_resolved_then_variable_then_saved_then_default_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert choose_target(None, None, None) == Target("local", DEFAULT_STATE_DIR)
    save_target(Target("stack", "saved", "us-west-2"))
    assert choose_target(None, None, None) == Target("stack", "saved", "us-west-2")
    monkeypatch.setenv("LORAFLOW_TARGET", "local:/srv/cloud")
    assert choose_target(None, None, None) == Target("local", "/srv/cloud")
    assert choose_target("", None, None) == Target("local", DEFAULT_STATE_DIR)  # bare --local
    assert choose_target(None, "cli", "eu-central-1") == Target("stack", "cli", "eu-central-1")


def test_given_local_dir_without_a_running_cloud_when_resolved_then_says_how_to_start_one(
    tmp_path: Path,
) -> None:
    with pytest.raises(TargetError, match="loraflow local up --state-dir"):
        resolve(Target("local", str(tmp_path)))


def test_given_local_endpoints_file_when_resolved_then_api_and_bucket_from_it(tmp_path: Path) -> None:
    endpoints = {
        "region": "us-east-1",
        "api_url": "http://127.0.0.1:9/",
        "api_key": "k",
        "dataset_bucket": "d",
        "aws_endpoint_url": "http://127.0.0.1:8",
    }
    (tmp_path / "endpoints.json").write_text(json.dumps(endpoints), encoding="utf-8")

    resolved = resolve(Target("local", str(tmp_path)))

    assert (resolved.api_url, resolved.api_key, resolved.dataset_bucket) == ("http://127.0.0.1:9/", "k", "d")
    assert resolved.client("s3").meta.endpoint_url == "http://127.0.0.1:8"


def _deploy(outputs: dict[str, str]) -> None:
    """A stack with the given outputs (moto's CloudFormation; one queue so the stack has a resource)."""
    template = {
        "Resources": {"Queue": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {name: {"Value": value} for name, value in outputs.items()},
    }
    boto3.client("cloudformation").create_stack(StackName="lf", TemplateBody=json.dumps(template))


def test_given_a_deployed_stack_when_resolved_then_its_api_its_key_value_and_its_dataset_bucket(
    aws: None,
) -> None:
    key = boto3.client("apigateway").create_api_key(name="lf", enabled=True, value="k" * 30)
    api_url = "https://abc123.execute-api.us-east-1.amazonaws.com/v1/"
    _deploy({API_URL_OUTPUT: api_url, API_KEY_OUTPUT: key["id"], DATASET_BUCKET_OUTPUT: "lf-datasets"})

    endpoints = resolve(Target("stack", "lf", "us-east-1"))

    assert (endpoints.api_url, endpoints.api_key, endpoints.dataset_bucket) == (
        api_url[:-1],
        "k" * 30,
        "lf-datasets",
    )
    assert endpoints.aws_endpoint_url is None  # the user's own AWS, as their credentials say


def test_given_a_stack_without_loraflow_outputs_when_resolved_then_one_error_naming_them(aws: None) -> None:
    _deploy({API_URL_OUTPUT: "https://abc123.execute-api.us-east-1.amazonaws.com/v1/"})

    with pytest.raises(
        TargetError, match=r"lacks the outputs .*ApiKeyId.*DatasetBucketName.*not a loraflow stack"
    ):
        resolve(Target("stack", "lf", "us-east-1"))


def test_given_the_template_when_its_outputs_are_read_then_it_has_every_output_the_client_reads() -> None:
    template, problems = decode(str(Path(__file__).resolve().parents[3] / "template.yaml"))
    assert not problems and template is not None
    outputs = template["Outputs"]

    assert {API_URL_OUTPUT, API_KEY_OUTPUT, DATASET_BUCKET_OUTPUT} <= outputs.keys()
