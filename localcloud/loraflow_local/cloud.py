"""`LocalCloud`: the whole stack of template.yaml running on moto in this process.

    with LocalCloud(state_dir) as cloud:
        cloud.endpoints["aws_endpoint_url"], cloud.endpoints["api_url"], ...

One local cloud per process: moto's backends and the patches are process-wide.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer

from loraflow_local import moto_patches
from loraflow_local.api_router import RestApiRouter, build_routes
from loraflow_local.base_model import ensure_tiny_model, tiny_model_uri, upload_folder
from loraflow_local.intrinsics import Deployed, Resolver, TemplateError
from loraflow_local.lambda_runtime import ModuleSandbox
from loraflow_local.provision import provision
from loraflow_local.provision_context import ProvisionContext, bucket_name
from loraflow_local.sagemaker_async import DEFAULT_SERVE_COMMAND
from loraflow_local.sagemaker_training import DEFAULT_COMMAND
from loraflow_local.services import LocalServices
from loraflow_local.sqs_poller import SqsPoller
from loraflow_local.template import StackTemplate, load_template

LOG = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"
LOCAL_SETTLE_SECONDS = "3"
# The environment variables this process gets while a cloud runs (restored on stop).
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MOTO_PORT",
)
_running = threading.Lock()


class LocalCloud:
    def __init__(
        self,
        state_dir: Path | str,
        aws_port: int = 0,
        api_port: int = 0,
        parameter_overrides: Mapping[str, str] | None = None,
        template_path: Path | None = None,
        region: str = "us-east-1",
        stack_name: str = "loraflow",
        training_command: Sequence[str] = DEFAULT_COMMAND,
        serve_command: Sequence[str] = DEFAULT_SERVE_COMMAND,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.aws_port = aws_port
        self.api_port = api_port
        self.parameter_overrides = dict(parameter_overrides or {})
        self.template_path = template_path or DEFAULT_TEMPLATE
        self.region = region
        self.stack_name = stack_name
        self.training_command = list(training_command)
        self.serve_command = list(serve_command)
        self.endpoints: dict[str, Any] = {}
        self.deployed: dict[str, Deployed] = {}
        self.context: ProvisionContext | None = None
        self._server: ThreadedMotoServer | None = None
        self._pollers: list[SqsPoller] = []
        self._routers: list[RestApiRouter] = []
        self._saved_env: dict[str, str | None] = {}
        self._services: LocalServices | None = None
        self._modules: ModuleSandbox | None = None
        self._started = False

    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> dict[str, Any]:
        if not _running.acquire(blocking=False):
            raise RuntimeError("a local cloud already runs in this process (moto's state is process-wide)")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.deployed.clear()
        url = self._start_moto()
        services = LocalServices(
            state_dir=self.state_dir,
            region=self.region,
            container_env=self._container_env(url),
            training_command=self.training_command,
            serve_command=self.serve_command,
        )
        self._services = services
        moto_patches.apply(services)
        local_defaults = self._local_defaults()
        stack = load_template(self.template_path, self.region, self.parameter_overrides, local_defaults)
        self.context = ctx = self._provision(stack, services)
        # Before anything can invoke a function: its modules must be this cloud's own.
        self._modules = ModuleSandbox(services.lambdas.code_paths())
        self._modules.enter()
        if stack.parameters.get("DefaultBaseModel") == local_defaults["DefaultBaseModel"]:
            model = ensure_tiny_model(self.state_dir / "base-models" / "tiny-sd")
            upload_folder(ctx.client("s3"), model, str(stack.parameters["DefaultBaseModel"]))
        self._pollers = [SqsPoller(mapping, services.lambdas, self.region) for mapping in ctx.sqs_mappings]
        for poller in self._pollers:
            poller.start()
        self._start_routers(ctx)
        self.endpoints = self._endpoints(url)
        endpoints_file = self.state_dir / "endpoints.json"
        endpoints_file.write_text(json.dumps(self.endpoints, indent=2) + "\n", encoding="utf-8")

    def _start_moto(self) -> str:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.aws_port, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        url = f"http://{host}:{port}"
        overlay = {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "MOTO_PORT": str(port),  # where moto's Step Functions interpreter sends its service calls
        }
        self._saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
        os.environ.update(overlay)
        _post_json(f"{url}/moto-api/reset", {})  # the previous cloud's resources, if any, are gone
        _post_json(f"{url}/moto-api/config", {"stepfunctions": {"execute_state_machine": True}})
        return url

    def _container_env(self, url: str) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # No internet here: a Hugging Face id fails at once instead of retrying the network.
            "HF_HUB_OFFLINE": "1",
        }

    def _local_defaults(self) -> dict[str, str]:
        """Parameter defaults for a laptop: a short settle time and the tiny model built at start."""
        return {
            "SettleSeconds": LOCAL_SETTLE_SECONDS,
            "DefaultBaseModel": tiny_model_uri(bucket_name(self.stack_name, "ArtifactsBucket")),
        }

    def _provision(self, stack: StackTemplate, services: LocalServices) -> ProvisionContext:
        stack_id = f"arn:aws:cloudformation:{self.region}:{DEFAULT_ACCOUNT_ID}:stack/{self.stack_name}/0"
        pseudo = {
            "AWS::Region": self.region,
            "AWS::AccountId": DEFAULT_ACCOUNT_ID,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": self.stack_name,
            "AWS::StackId": stack_id,
            "AWS::NotificationARNs": "",
        }
        resolver = Resolver(stack.parameters, pseudo, self.deployed, stack.conditions, stack.mappings)
        ctx = ProvisionContext(stack, resolver, services, self.stack_name, self.region, DEFAULT_ACCOUNT_ID)
        provision(ctx, self.deployed)
        return ctx

    def _start_routers(self, ctx: ProvisionContext) -> None:
        names_by_arn = {ctx.services.lambdas.spec(name).arn: name for name in ctx.services.lambdas.names()}
        for index, record in enumerate(ctx.rest_apis.values()):
            if record.stage is None:
                raise TemplateError(f"REST API {record.name} has no stage")
            keys = [ctx.api_keys[key] for key in sorted(record.key_ids) if key in ctx.api_keys]
            router = RestApiRouter(
                record.api_id,
                record.stage,
                build_routes(record.body, names_by_arn),
                keys,
                ctx.services.lambdas,
                port=self.api_port if index == 0 else 0,
            )
            router.start()
            self._routers.append(router)

    def _endpoints(self, url: str) -> dict[str, Any]:
        def ref(logical_id: str) -> Any:
            return self.deployed[logical_id].ref if logical_id in self.deployed else None

        assert self.context is not None
        first_api = next(iter(self.context.rest_apis.values()), None)
        api_keys = [self.context.api_keys[key] for key in sorted(first_api.key_ids)] if first_api else []
        return {
            "aws_endpoint_url": url,
            "region": self.region,
            "api_url": self._routers[0].url if self._routers else None,
            "api_key": api_keys[0] if api_keys else None,
            "dataset_bucket": ref("DatasetBucket"),
            "artifacts_bucket": ref("ArtifactsBucket"),
            "notification_topic_arn": ref("NotificationTopic"),
            "state_machine_arn": ref("TrainingPipeline"),
            "jobs_table": ref("JobsTable"),
            "state_dir": str(self.state_dir),
        }

    def stop(self) -> None:
        """Stop pollers, the API, training and inference processes, then moto; idempotent."""
        if not self._started:
            return
        for poller in self._pollers:
            poller.stop()
        for router in self._routers:
            router.stop()
        if self._services is not None:
            self._services.stop()
        moto_patches.release()
        if self._server is not None:
            self._server.stop()
        if self._modules is not None:
            self._modules.exit()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._pollers, self._routers, self._server, self._services, self._modules = [], [], None, None, None
        self._started = False
        _running.release()


def _post_json(url: str, body: Mapping[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
