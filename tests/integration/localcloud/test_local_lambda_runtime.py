"""The in-process Lambda runtime: module isolation between local clouds of one process."""

from __future__ import annotations

import importlib
import json
import sys
import urllib.request
from pathlib import Path

import pytest
from loraflow_local.cloud import LocalCloud
from loraflow_local.lambda_runtime import ModuleSandbox

pytestmark = pytest.mark.integration


def test_given_imported_module_when_sandbox_entered_then_fresh_copy_and_original_restored_on_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "sandboxed_settings.py").write_text("import os\nENDPOINT = os.environ.get('ENDPOINT')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ENDPOINT", "first")
    original = importlib.import_module("sandboxed_settings")
    sandbox = ModuleSandbox([tmp_path])
    sandbox.enter()
    monkeypatch.setenv("ENDPOINT", "second")
    fresh = importlib.import_module("sandboxed_settings")
    assert (original.ENDPOINT, fresh.ENDPOINT) == ("first", "second")
    sandbox.exit()
    assert sys.modules["sandboxed_settings"] is original
    assert "json" in sys.modules and sys.modules["json"] is json  # modules from elsewhere are left alone
    del sys.modules["sandboxed_settings"]


def _api_status(cloud: LocalCloud) -> int:
    request = urllib.request.Request(
        cloud.endpoints["api_url"] + "/jobs?dataset=x", headers={"x-api-key": cloud.endpoints["api_key"]}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def test_given_second_cloud_in_one_process_when_functions_called_then_they_use_the_new_stack(tmp_path: Path):
    overrides = {"DefaultBaseModel": "s3://somewhere/base/"}
    handler_module = "loraflow_api.app"
    before = sys.modules.get(handler_module)
    with LocalCloud(tmp_path / "first", parameter_overrides=overrides) as first:
        assert _api_status(first) == 200  # cold start: clients bound to the first moto server
        first_copy = sys.modules[handler_module]
    assert sys.modules.get(handler_module) is before
    with LocalCloud(tmp_path / "second", parameter_overrides=overrides) as second:
        assert _api_status(second) == 200
        assert sys.modules[handler_module] is not first_copy
