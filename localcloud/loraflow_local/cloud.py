"""`LocalCloud`: the whole stack of template.yaml running on moto in this process.

    with LocalCloud(state_dir) as cloud:
        cloud.endpoints["aws_endpoint_url"], cloud.endpoints["api_url"], ...

One local cloud per process: moto's backends and the patches are process-wide. Its state (S3 objects,
DynamoDB items, users' queues, topics and subscriptions, the API key, the ports) is saved under
`<state_dir>/saved/` (`persistence`) and restored when a cloud starts again on the same folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from loraflow_shared.jobs.control import JobControl
from loraflow_shared.jobs.control_aws import build_control
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer

from loraflow_local import moto_patches
from loraflow_local.api_router import RestApiRouter, build_routes
from loraflow_local.base_model import ensure_tiny_models, tiny_model_uri, upload_folder
from loraflow_local.intrinsics import Deployed, Resolver, TemplateError
from loraflow_local.lambda_runtime import ModuleSandbox
from loraflow_local.persistence import (
    DEFAULT_SAVE_INTERVAL_S,
    CloudSettings,
    PeriodicSaver,
    RestoreReport,
    ServiceSnapshot,
    StateStore,
    port_to_use,
    service_snapshots,
    write_atomically,
)
from loraflow_local.provision import provision
from loraflow_local.provision_context import ProvisionContext, bucket_name
from loraflow_local.reconcile import requeue_uploads
from loraflow_local.resume import resume_interrupted_jobs
from loraflow_local.sagemaker_async import DEFAULT_SERVE_COMMAND
from loraflow_local.sagemaker_training import DEFAULT_COMMAND
from loraflow_local.services import LocalServices
from loraflow_local.sqs_poller import SqsPoller
from loraflow_local.template import StackTemplate, load_template

LOG = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"
LOCAL_SETTLE_SECONDS = "3"
# The trainer's `TrainerSettings.loraflow_progress_interval_s` (15 s on AWS, where progress.json is synced
# to S3): on a laptop the checkpoint folder is local, so the CLI's bar and the gallery update every 2 s.
PROGRESS_INTERVAL_VARIABLE = "LORAFLOW_PROGRESS_INTERVAL_S"
LOCAL_PROGRESS_INTERVAL_S = "2"
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
        fresh: bool = False,
        save_interval_s: float = DEFAULT_SAVE_INTERVAL_S,
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
        self.fresh = fresh  # discard the saved state instead of restoring it
        self.save_interval_s = save_interval_s  # 0: save only on stop
        self.restored = RestoreReport(restored=False)
        self.endpoints: dict[str, Any] = {}
        self.deployed: dict[str, Deployed] = {}
        self.context: ProvisionContext | None = None
        self._server: ThreadedMotoServer | None = None
        self._pollers: list[SqsPoller] = []
        self._routers: list[RestApiRouter] = []
        self._saved_env: dict[str, str | None] = {}
        self._services: LocalServices | None = None
        self._modules: ModuleSandbox | None = None
        self._store = StateStore(self.state_dir / "saved")
        self._snapshots: list[ServiceSnapshot] = []
        self._saver: PeriodicSaver | None = None
        self._restore_done = False  # only then may a save replace what is saved
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
        self._endpoints_file.unlink(missing_ok=True)  # a crashed cloud's: written again once this one serves
        self.deployed.clear()
        if self.fresh:
            self._store.discard()
        self._store.load()
        saved = self._store.cloud_settings()
        url = self._start_moto(port_to_use(self.aws_port, saved.aws_port, "--aws-port"))
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
        self.context = ctx = self._provision(stack, services, saved.api_keys)
        self._restore(ctx)
        # Before anything can invoke a function: its modules must be this cloud's own.
        self._modules = ModuleSandbox(services.lambdas.code_paths())
        self._modules.enter()
        if stack.parameters.get("DefaultBaseModel") == local_defaults["DefaultBaseModel"]:
            artifacts = bucket_name(self.stack_name, "ArtifactsBucket")
            for model in ensure_tiny_models(self.state_dir / "base-models"):
                upload_folder(ctx.client("s3"), model, tiny_model_uri(artifacts, model.name))
        self._pollers = [SqsPoller(mapping, services.lambdas, self.region) for mapping in ctx.sqs_mappings]
        for poller in self._pollers:
            poller.start()
        self._start_routers(ctx, port_to_use(self.api_port, saved.api_port, "--api-port"))
        self.endpoints = self._endpoints(url)
        # Atomically: scripts poll for the file and read it as soon as it appears.
        write_atomically(self._endpoints_file, json.dumps(self.endpoints, indent=2) + "\n")
        self._saver = PeriodicSaver(self.save_state, self.save_interval_s)
        self._saver.start()
        self.resume_after_restart(self.restored)

    @property
    def _endpoints_file(self) -> Path:
        return self.state_dir / "endpoints.json"

    def _restore(self, ctx: ProvisionContext) -> None:
        """Recreate the saved state on top of what the template provisioned (S3 before SNS: queues exist)."""
        self._snapshots = service_snapshots(ctx.client, self._store.blob_dir, self.region)
        self.restored = self._store.restore(self._snapshots)
        self._restore_done = True
        if self.restored.restored:
            LOG.info("restored the state saved at %s: %s", self.restored.saved_at, dict(self.restored.counts))

    def resume_after_restart(self, restored: RestoreReport) -> None:
        """Pick up the work the last stop interrupted; called once per start, after the saved state is
        restored and everything runs (functions, SQS pollers, the API), before `start` returns.

        Available here: `restored` (what was restored), `self.context` (boto3 clients bound to this cloud,
        the provisioned resources), `self.deployed` (physical names by logical id), `self.endpoints`.
        Upload events that were still waiting in SQS are re-sent (`reconcile`), and jobs caught mid-way
        carry on from their checkpoints (`resume`).
        """
        if not restored.restored or self.context is None:
            return
        requeue_uploads(self.context.client("s3"), self.context.client("sqs"), self.region)
        resume_interrupted_jobs(*self._job_control())

    def _job_control(self) -> tuple[JobRepository, JobControl]:
        """Job control over this cloud's stack, as the functions build it (the stack's own names)."""
        assert self.context is not None
        ctx = self.context
        ref = {logical_id: deployed.ref for logical_id, deployed in self.deployed.items()}
        repository = JobRepository(
            boto3.resource("dynamodb", region_name=self.region).Table(ref["JobsTable"])
        )
        notifier = Notifier(ctx.client("sns"), ref["NotificationTopic"])
        clients = {name: ctx.client(name) for name in ("stepfunctions", "sagemaker", "s3", "sqs")}
        control = build_control(
            repository,
            notifier,
            clients,
            ref["TrainingPipeline"],
            ref["ArtifactsBucket"],
            ref["UploadEventsQueue"],
        )
        return repository, control

    def save_state(self) -> None:
        """Save S3, DynamoDB, users' SQS/SNS resources, the ports and the API key under `<state>/saved/`."""
        if not self._restore_done or self.context is None:
            return  # a cloud that failed to restore must not overwrite what is saved
        cloud = CloudSettings(
            aws_port=self._server.get_host_and_port()[1] if self._server is not None else None,
            api_port=self._routers[0].port if self._routers else self._store.cloud_settings().api_port,
            api_keys=dict(self.context.api_key_values),
        )
        self._store.save(cloud, self._snapshots)

    def _start_moto(self, port: int) -> str:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
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
            PROGRESS_INTERVAL_VARIABLE: os.environ.get(PROGRESS_INTERVAL_VARIABLE, LOCAL_PROGRESS_INTERVAL_S),
            **_hub_env(),
        }

    def _local_defaults(self) -> dict[str, str]:
        """Parameter defaults for a laptop: a short settle time and the tiny model built at start."""
        return {
            "SettleSeconds": LOCAL_SETTLE_SECONDS,
            "DefaultBaseModel": tiny_model_uri(bucket_name(self.stack_name, "ArtifactsBucket")),
        }

    def _provision(
        self, stack: StackTemplate, services: LocalServices, api_key_values: Mapping[str, str]
    ) -> ProvisionContext:
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
        ctx.api_key_values.update(api_key_values)
        provision(ctx, self.deployed)
        return ctx

    def _start_routers(self, ctx: ProvisionContext, first_port: int) -> None:
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
                port=first_port if index == 0 else 0,
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
        """Stop taking work, interrupt training (checkpoints synced), save the state, then stop moto;
        idempotent. endpoints.json is removed: nothing answers there any more."""
        if not self._started:
            return
        if self._saver is not None:
            self._saver.stop()
        for poller in self._pollers:
            poller.request_stop()  # all at once: each may be in a 1 s long poll
        for poller in self._pollers:
            poller.stop()
        for router in self._routers:
            router.stop()
        self._stop_work()
        self._save_on_stop()
        moto_patches.release()
        self._stop_moto()
        if self._modules is not None:
            self._modules.exit()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._endpoints_file.unlink(missing_ok=True)
        self._pollers, self._routers, self._server, self._services, self._modules = [], [], None, None, None
        self._saver, self._restore_done, self._started = None, False, False
        _running.release()

    def _stop_work(self) -> None:
        """Training runs are interrupted (as by a spot interruption: they checkpoint, S3 gets it), then the
        running executions are aborted, so no interpreter thread outlives this cloud (and reaches the next
        one on the same port). The jobs keep their state in the table for the next start."""
        if self._services is None:
            return
        self._services.interrupt_trainings()
        if self.context is not None:
            with contextlib.suppress(BotoCoreError, ClientError):  # moto may be what failed to start
                _abort_executions(self.context.client("stepfunctions"))
        self._services.stop()

    def _save_on_stop(self) -> None:
        try:
            self.save_state()
        except Exception:  # stopping goes on; the last periodic save is what the next start finds
            LOG.exception("could not save the local cloud's state in %s", self._store.folder)

    def _stop_moto(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        listening = getattr(self._server, "_server", None)  # moto's stop leaves the socket open
        if listening is not None:
            listening.server_close()


def _abort_executions(stepfunctions: Any) -> None:
    for page in stepfunctions.get_paginator("list_state_machines").paginate():
        for machine in page["stateMachines"]:
            running = stepfunctions.get_paginator("list_executions").paginate(
                stateMachineArn=machine["stateMachineArn"], statusFilter="RUNNING"
            )
            for execution in (item for listed in running for item in listed["executions"]):
                stepfunctions.stop_execution(
                    executionArn=execution["executionArn"],
                    error="LocalCloudStopped",
                    cause="the local cloud stopped",
                )


def _post_json(url: str, body: Mapping[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _hub_env() -> dict[str, str]:
    """The containers' Hub: the one this process was given (`HF_ENDPOINT`, e.g. a Hub served on loopback),
    else none: no internet here, so a Hugging Face id fails at once instead of retrying the network."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return {"HF_ENDPOINT": endpoint} if endpoint else {"HF_HUB_OFFLINE": "1"}
