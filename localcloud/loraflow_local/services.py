"""What the moto patches delegate to: the Lambda registry, local training runs and async endpoints.

One `LocalServices` belongs to one running local cloud; `moto_patches.apply(services)` binds it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loraflow_local.lambda_runtime import LambdaRegistry
from loraflow_local.sagemaker_async import DEFAULT_SERVE_COMMAND, AsyncEndpoint, AsyncEndpointConfig
from loraflow_local.sagemaker_training import (
    DEFAULT_CHECKPOINT_SYNC_S,
    DEFAULT_COMMAND,
    LocalTrainingRun,
    StatusListener,
    TrainingJobSpec,
)

LOG = logging.getLogger(__name__)


@dataclass
class LocalServices:
    state_dir: Path
    region: str
    # Environment every local container gets on top of this process's: the endpoint URL, credentials.
    container_env: Mapping[str, str]
    lambdas: LambdaRegistry = field(default_factory=LambdaRegistry)
    training_command: Sequence[str] = DEFAULT_COMMAND
    serve_command: Sequence[str] = DEFAULT_SERVE_COMMAND
    # How often a running training job's checkpoint folder is mirrored to its CheckpointConfig.S3Uri.
    checkpoint_sync_s: float = DEFAULT_CHECKPOINT_SYNC_S
    _trainings: dict[str, LocalTrainingRun] = field(default_factory=dict)
    _endpoints: dict[str, AsyncEndpoint] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def launch_training(self, spec: TrainingJobSpec, on_status: StatusListener) -> LocalTrainingRun:
        run = LocalTrainingRun(
            spec,
            workdir=self.state_dir / "sagemaker" / "training" / spec.name,
            on_status=on_status,
            container_env=self.container_env,
            command=self.training_command,
            checkpoint_sync_s=self.checkpoint_sync_s,
        )
        with self._lock:
            self._trainings[spec.name] = run
        run.start()
        return run

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
                )
                self._endpoints[name] = endpoint
            return endpoint

    def stop(self) -> None:
        """Stop training processes and endpoint servers (their jobs end as Stopped)."""
        with self._lock:
            trainings, endpoints = list(self._trainings.values()), list(self._endpoints.values())
        for run in trainings:
            run.stop()
        for endpoint in endpoints:
            endpoint.stop()
