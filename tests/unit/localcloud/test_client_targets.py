"""Which loraflow a client command talks to: command line, then LORAFLOW_TARGET, then the saved default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loraflow_local.targets import (
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
