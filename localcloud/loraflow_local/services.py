"""What the moto patches delegate to: the Lambda registry, local training runs and async endpoints.

One `LocalServices` belongs to one running local cloud; `moto_patches.apply(services)` binds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loraflow_local.cloud_logs import LogShipper, training_destination
from loraflow_local.lambda_runtime import LambdaRegistry
from loraflow_local.log_capture import unroute_std_streams
from loraflow_local.sagemaker_async import DEFAULT_SERVE_COMMAND, AsyncEndpoint, AsyncEndpointConfig
from loraflow_local.sagemaker_training import (
    DEFAULT_CHECKPOINT_SYNC_S,
    DEFAULT_COMMAND,
    DEFAULT_STOP_GRACE_S,
    LocalTrainingRun,
    StatusListener,
    StopReason,
    TrainingJobSpec,
)

LOG = logging.getLogger(__name__)

DEFAULT_INTERRUPT_GRACE_S = 30.0  # time a trainer gets to checkpoint when the local cloud shuts down


@dataclass
class LocalServices:
    state_dir: Path
    region: str
    # Environment every local container gets on top of this process's: the endpoint URL, credentials.
    container_env: Mapping[str, str]
    training_command: Sequence[str] = DEFAULT_COMMAND
    serve_command: Sequence[str] = DEFAULT_SERVE_COMMAND
    # How often a running training job's checkpoint folder is mirrored to its CheckpointConfig.S3Uri.
    checkpoint_sync_s: float = DEFAULT_CHECKPOINT_SYNC_S
    # SIGTERM to SIGKILL for StopTrainingJob (SageMaker: 120 s), and for the shutdown interruption.
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    interrupt_grace_s: float = DEFAULT_INTERRUPT_GRACE_S
    # Built in __post_init__: log lines go to container_env's AWS_ENDPOINT_URL and under state_dir/logs.
    logs: LogShipper = field(init=False)
    lambdas: LambdaRegistry = field(init=False)
    _trainings: dict[str, LocalTrainingRun] = field(default_factory=dict)
    _endpoints: dict[str, AsyncEndpoint] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.logs = LogShipper(self.region, self.container_env.get("AWS_ENDPOINT_URL"))
        self.lambdas = LambdaRegistry(self.logs, self.log_dir / "lambda")

    @property
    def log_dir(self) -> Path:
        """Function logs on disk: `<log_dir>/lambda/<function>.log` (containers log in their workdirs)."""
        return self.state_dir / "logs"

    def launch_training(self, spec: TrainingJobSpec, on_status: StatusListener) -> LocalTrainingRun:
        destination = training_destination(spec.name, int(time.time()))
        run = LocalTrainingRun(
            spec,
            workdir=self.state_dir / "sagemaker" / "training" / spec.name,
            on_status=on_status,
            container_env=self.container_env,
            command=self.training_command,
            checkpoint_sync_s=self.checkpoint_sync_s,
            on_log_line=self.logs.line_writer(destination),
        )
        with self._lock:
            self._trainings[spec.name] = run
        run.start()
        return run

    def stop_training(self, name: str) -> bool:
        """StopTrainingJob: SIGTERM, SIGKILL after `stop_grace_s`; False when no run of it is going on."""
        with self._lock:
            run = self._trainings.get(name)
        return run is not None and run.request_stop(StopReason.STOPPED, self.stop_grace_s)

    def endpoint(self, name: str, config_factory: Callable[[], AsyncEndpointConfig]) -> AsyncEndpoint:
        """The emulator for an endpoint, created from its config on first use."""
        with self._lock:
            endpoint = self._endpoints.get(name)
            if endpoint is None:
                endpoint = AsyncEndpoint(
                    name,
                    config_factory(),
                    workdir=self.state_dir / "sagemaker" / "endpoints" / name,
                    container_env=self.container_env,
                    region=self.region,
                    command=self.serve_command,
                    logs=self.logs,
                )
                self._endpoints[name] = endpoint
            return endpoint

    def interrupt_trainings(self) -> None:
        """As a spot interruption: SIGTERM (the trainer checkpoints), a last checkpoint sync; no job ends."""
        with self._lock:
            trainings = list(self._trainings.values())
        for run in trainings:
            run.request_stop(StopReason.INTERRUPTED, self.interrupt_grace_s)
        for run in trainings:
            run.join(self.interrupt_grace_s + 30)

    def stop(self) -> None:
        """Interrupt training processes, stop endpoint servers, send the last log lines, give the std
        streams back (functions' loggers keep writing through the routed ones, to the same place)."""
        self.interrupt_trainings()
        with self._lock:
            endpoints = list(self._endpoints.values())
        for endpoint in endpoints:
            endpoint.stop()
        self.logs.stop()
        unroute_std_streams()
