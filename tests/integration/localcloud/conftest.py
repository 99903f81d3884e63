"""A moto server in this process with loraflow's patches bound to test services (fake containers)."""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from loraflow_local import moto_patches
from loraflow_local.lambda_runtime import FunctionSpec
from loraflow_local.moto_server import moto_server
from loraflow_local.services import LocalServices

FAKES = Path(__file__).parent / "fakes"
if str(FAKES) not in sys.path:  # the registry would add it at the first cold start; tests read the module too
    sys.path.insert(0, str(FAKES))
FAKE_TRAINER = (sys.executable, str(FAKES / "fake_trainer.py"))
FAKE_MODEL_SERVER = (sys.executable, str(FAKES / "fake_model_server.py"), "serve")
REGION = "us-east-1"


def _post(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).read()


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The environment a local cloud gives its process; moto's state is reset for each test."""
    for key, value in {
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "MOTO_PORT": moto_url.rsplit(":", 1)[1],
    }.items():
        monkeypatch.setenv(key, value)
    _post(f"{moto_url}/moto-api/reset", {})
    _post(f"{moto_url}/moto-api/config", {"stepfunctions": {"execute_state_machine": True}})
    return moto_url


@pytest.fixture
def services(aws_env: str, tmp_path: Path) -> Iterator[LocalServices]:
    bound = LocalServices(
        state_dir=tmp_path / "state",
        region=REGION,
        container_env={
            "AWS_ENDPOINT_URL": aws_env,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
        },
        training_command=FAKE_TRAINER,
        serve_command=FAKE_MODEL_SERVER,
        checkpoint_sync_s=0.1,
    )
    moto_patches.apply(bound)
    yield bound
    bound.stop()
    moto_patches.release()


@pytest.fixture
def client(aws_env: str) -> Callable[[str], Any]:
    return lambda service: boto3.client(service, region_name=REGION)  # type: ignore[call-overload]


@pytest.fixture
def deploy_function(services: LocalServices, client: Callable[[str], Any]) -> Callable[..., str]:
    """Create a function in moto backed by a handler module in fakes/; return its ARN."""
    iam = client("iam")
    role = iam.create_role(RoleName="test-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]

    def deploy(name: str, handler: str, environment: dict[str, str] | None = None, timeout: int = 30) -> str:
        arn: str = client("lambda").create_function(
            FunctionName=name,
            Runtime="python3.12",
            Role=role,
            Handler=handler,
            Code={"ZipFile": _empty_zip()},
        )["FunctionArn"]
        services.lambdas.register(
            FunctionSpec(
                name=name,
                arn=arn,
                handler=handler,
                code_paths=(FAKES,),
                environment=environment or {},
                timeout_s=timeout,
            )
        )
        return arn

    return deploy


def _empty_zip() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("placeholder.txt", "")
    return buffer.getvalue()


def _wait_for(check: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval_s)
    pytest.fail(f"condition not met within {timeout_s}s")


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """Poll until `check()` returns something truthy; fail the test on timeout."""
    return _wait_for


@pytest.fixture
def recorded_events() -> list[Any]:
    """Events recorded by the `record`-style test handlers (as the registry imported them), emptied first."""
    import loraflow_local_test_handlers as handlers  # the registry put fakes/ on sys.path

    handlers.EVENTS.clear()
    return handlers.EVENTS
