"""A SageMaker training job run as a local process, with SageMaker's directory layout and environment.

Layout under the job's workdir (SageMaker's `/opt/ml`): `input/config/{hyperparameters,inputdataconfig,
resourceconfig}.json`, `input/data/<channel>/`, `model/`, `output/data/`, `output/failure`, `checkpoints/`.
The process learns the paths from `SM_*` variables (`loraflow_diffusion`'s path contract), so the same
entrypoint runs unchanged in the container. On exit 0 `model/` is uploaded as
`<S3OutputPath>/<job>/output/model.tar.gz`; otherwise the failure file becomes the `FailureReason`.
With a `CheckpointConfig`, `checkpoints/` is restored from and mirrored to its `S3Uri` (`checkpoint_sync`).
Managed spot is accepted and runs as on demand; the local cloud shutting down interrupts a job as a spot
interruption would (SIGTERM, the trainer checkpoints, a last sync), without ending it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import boto3

from loraflow_local.checkpoint_sync import CheckpointSync
from loraflow_local.local_process import end_process, start_process
from loraflow_local.log_capture import FileTail
from loraflow_local.s3_util import download_prefix, join_s3_uri, split_s3_uri

LOG = logging.getLogger(__name__)

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "loraflow_training", "train")
FAILURE_REASON_LIMIT = 1024  # DescribeTrainingJob's FailureReason maximum length
DEFAULT_MAX_RUNTIME_S = 86400  # SageMaker's default StoppingCondition
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"  # CheckpointConfig.LocalPath's default; `checkpoints/` here
DEFAULT_CHECKPOINT_SYNC_S = 5.0
DEFAULT_STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL; SageMaker waits 120 s


@dataclass(frozen=True)
class TrainingJobSpec:
    """The parts of a CreateTrainingJob request that shape the run."""

    name: str
    hyperparameters: Mapping[str, str]
    input_data_config: Sequence[Mapping[str, Any]]
    output_path: str  # OutputDataConfig.S3OutputPath
    resource_config: Mapping[str, Any] = field(default_factory=dict)
    max_runtime_s: int = DEFAULT_MAX_RUNTIME_S
    environment: Mapping[str, str] = field(default_factory=dict)
    checkpoint_s3_uri: str | None = None  # CheckpointConfig.S3Uri
    checkpoint_local_path: str = CHECKPOINT_LOCAL_PATH

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> TrainingJobSpec:
        stopping = request.get("StoppingCondition") or {}
        checkpoint = request.get("CheckpointConfig") or {}
        return cls(
            name=request["TrainingJobName"],
            hyperparameters=dict(request.get("HyperParameters") or {}),
            input_data_config=list(request.get("InputDataConfig") or []),
            output_path=request["OutputDataConfig"]["S3OutputPath"],
            resource_config=dict(request.get("ResourceConfig") or {}),
            max_runtime_s=int(stopping.get("MaxRuntimeInSeconds", DEFAULT_MAX_RUNTIME_S)),
            environment=dict(request.get("Environment") or {}),
            checkpoint_s3_uri=checkpoint.get("S3Uri"),
            checkpoint_local_path=checkpoint.get("LocalPath") or CHECKPOINT_LOCAL_PATH,
        )

    @property
    def model_artifacts_uri(self) -> str:
        return join_s3_uri(self.output_path, self.name, "output", "model.tar.gz")


@dataclass(frozen=True)
class TrainingStatus:
    """One status change, in DescribeTrainingJob's terms."""

    status: str  # InProgress | Completed | Failed | Stopped
    secondary_status: str
    failure_reason: str | None = None


StatusListener = Callable[[TrainingStatus], None]


class StopReason(Enum):
    STOPPED = "Stopped"  # StopTrainingJob: the job ends Stopped
    INTERRUPTED = "Interrupted"  # the local cloud shutting down: like a spot interruption, not an end


class LocalTrainingRun:
    """Runs one job to its end in a background thread, reporting each status change to `on_status`.

    `request_stop` ends the process as SageMaker does (SIGTERM, then SIGKILL after a grace period); the
    checkpoint folder is synced a last time either way. A stopped job ends `Stopped`; an interrupted one
    (the local cloud shutting down) stays `InProgress`/`Interrupted`, its checkpoints in S3 for a resume.
    """

    def __init__(
        self,
        spec: TrainingJobSpec,
        workdir: Path,
        on_status: StatusListener,
        container_env: Mapping[str, str],
        command: Sequence[str] = DEFAULT_COMMAND,
        checkpoint_sync_s: float = DEFAULT_CHECKPOINT_SYNC_S,
        on_log_line: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self._on_status = on_status
        self._container_env = dict(container_env)
        self._command = list(command)
        self._checkpoint_sync_s = checkpoint_sync_s
        self._on_log_line = on_log_line
        self._stop_requested = threading.Event()
        self._stop_reason: StopReason | None = None
        self._grace_s = DEFAULT_STOP_GRACE_S
        self._thread = threading.Thread(target=self.run, name=f"training-{spec.name}", daemon=True)

    @property
    def log_path(self) -> Path:
        return self.workdir / "training.log"

    def start(self) -> None:
        self._thread.start()

    def request_stop(self, reason: StopReason, grace_s: float) -> bool:
        """Ask the run to end (the first reason wins); False when it has ended already."""
        if not self._thread.is_alive():
            return False
        if self._stop_reason is None:
            self._stop_reason, self._grace_s = reason, grace_s
        self._stop_requested.set()
        return True

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def run(self) -> TrainingStatus:
        try:
            final = self._run_stages()
        except Exception as exc:  # local trouble (S3, disk): the job fails with a reason, never hangs
            LOG.exception("training job %s could not run", self.spec.name)
            final = TrainingStatus("Failed", "Failed", f"ClientError: {type(exc).__name__}: {exc}"[:1024])
        self._on_status(final)
        return final

    @property
    def checkpoint_dir(self) -> Path:
        return self.workdir / "checkpoints"

    def _run_stages(self) -> TrainingStatus:
        s3 = boto3.client("s3")
        self._on_status(TrainingStatus("InProgress", "Downloading"))
        self._prepare_workdir(s3)
        checkpoints = self._checkpoint_sync(s3)
        self._on_status(TrainingStatus("InProgress", "Training"))
        with checkpoints.running() if checkpoints is not None else nullcontext():
            outcome = self._run_process()
        if outcome is not None:
            return outcome
        self._on_status(TrainingStatus("InProgress", "Uploading"))
        self._upload_outputs(s3)
        return TrainingStatus("Completed", "Completed")

    def _prepare_workdir(self, s3: Any) -> None:
        config_dir = self.workdir / "input" / "config"
        for folder in ("input/config", "model", "output/data", "checkpoints"):
            (self.workdir / folder).mkdir(parents=True, exist_ok=True)
        channels = {item["ChannelName"]: _channel_config(item) for item in self.spec.input_data_config}
        _write_json(config_dir / "hyperparameters.json", dict(self.spec.hyperparameters))
        _write_json(config_dir / "inputdataconfig.json", channels)
        _write_json(config_dir / "resourceconfig.json", _resource_config(self.spec.resource_config))
        for channel in self.spec.input_data_config:
            source = channel["DataSource"]["S3DataSource"]
            if source.get("S3DataType", "S3Prefix") != "S3Prefix":
                raise ValueError(f"channel {channel['ChannelName']}: only S3Prefix data sources run locally")
            target = self.workdir / "input" / "data" / channel["ChannelName"]
            count = download_prefix(s3, source["S3Uri"], target)
            LOG.info("training job %s: channel %s: %d files", self.spec.name, channel["ChannelName"], count)

    def _checkpoint_sync(self, s3: Any) -> CheckpointSync | None:
        if self.spec.checkpoint_s3_uri is None:
            return None
        if self.spec.checkpoint_local_path.rstrip("/") != CHECKPOINT_LOCAL_PATH:
            raise ValueError(f"CheckpointConfig.LocalPath: only {CHECKPOINT_LOCAL_PATH} runs locally")
        sync = CheckpointSync(s3, self.spec.checkpoint_s3_uri, self.checkpoint_dir, self._checkpoint_sync_s)
        count = sync.restore()
        LOG.info("training job %s: %d checkpoint files restored", self.spec.name, count)
        return sync

    def environment(self) -> dict[str, str]:
        root = self.workdir
        layout = {
            "SM_INPUT_DIR": str(root / "input"),
            "SM_INPUT_CONFIG_DIR": str(root / "input" / "config"),
            "SM_MODEL_DIR": str(root / "model"),
            "SM_OUTPUT_DIR": str(root / "output"),
            "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
            "SM_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "TRAINING_JOB_NAME": self.spec.name,
        }
        names = [channel["ChannelName"] for channel in self.spec.input_data_config]
        channels = {f"SM_CHANNEL_{name.upper()}": str(root / "input" / "data" / name) for name in names}
        return {**os.environ, **self._container_env, **dict(self.spec.environment), **layout, **channels}

    def _run_process(self) -> TrainingStatus | None:
        """Run the entrypoint; None when it succeeded, else the final status."""
        if self._stop_requested.is_set():
            return self._stopped_status()
        tail = self._log_tail()
        with self.log_path.open("ab") as log:
            self.process = process = start_process(self._command, self.workdir, self.environment(), log)
        if tail is not None:
            tail.start()
        try:
            timed_out = self._wait(process)
        finally:
            if tail is not None:
                tail.stop()
        if self._stop_reason is not None:
            return self._stopped_status()
        if timed_out:
            reason = f"MaxRuntimeInSeconds exceeded ({self.spec.max_runtime_s} s)"
            return TrainingStatus("Failed", "MaxRuntimeExceeded", reason)
        if process.returncode != 0:
            return TrainingStatus("Failed", "Failed", self._failure_reason(process.returncode))
        return None

    def _log_tail(self) -> FileTail | None:
        """Ships the lines the process adds to training.log (a restarted job's file keeps the old ones)."""
        if self._on_log_line is None:
            return None
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        return FileTail(self.log_path, self._on_log_line, offset)

    def _wait(self, process: subprocess.Popen[bytes]) -> bool:
        """Wait for the process; end it on a stop request or past MaxRuntimeInSeconds (then True)."""
        deadline = time.monotonic() + self.spec.max_runtime_s
        while process.poll() is None:
            if self._stop_requested.wait(0.5):
                end_process(process, self._grace_s)
                return False
            if time.monotonic() >= deadline:
                end_process(process, self._grace_s)
                return True
        return False

    def _stopped_status(self) -> TrainingStatus:
        if self._stop_reason is StopReason.INTERRUPTED:
            return TrainingStatus("InProgress", "Interrupted")
        return TrainingStatus("Stopped", "Stopped")

    def _failure_reason(self, exit_code: int) -> str:
        failure_file = self.workdir / "output" / "failure"
        if failure_file.is_file():
            text = failure_file.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text[:FAILURE_REASON_LIMIT]
        reason = f"AlgorithmError: exit code {exit_code} and no failure file; see {self.log_path}"
        return reason[:FAILURE_REASON_LIMIT]

    def _upload_outputs(self, s3: Any) -> None:
        bucket, key = split_s3_uri(self.spec.model_artifacts_uri)
        archive = self.workdir / "model.tar.gz"
        _tar_folder(self.workdir / "model", archive)
        s3.upload_file(str(archive), bucket, key)
        output_archive = self.workdir / "output.tar.gz"
        _tar_folder(self.workdir / "output" / "data", output_archive)
        s3.upload_file(str(output_archive), bucket, key.rsplit("/", 1)[0] + "/output.tar.gz")


def _channel_config(channel: Mapping[str, Any]) -> dict[str, Any]:
    source = channel["DataSource"]["S3DataSource"]
    config = {
        "TrainingInputMode": channel.get("InputMode", "File"),
        "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
        "RecordWrapperType": channel.get("RecordWrapperType", "None"),
    }
    if "ContentType" in channel:
        config["ContentType"] = channel["ContentType"]
    return config


def _resource_config(requested: Mapping[str, Any]) -> dict[str, Any]:
    hosts = [f"algo-{index + 1}" for index in range(int(requested.get("InstanceCount", 1)))]
    return {
        "current_host": hosts[0],
        "current_instance_type": requested.get("InstanceType", "local"),
        "hosts": hosts,
        "network_interface_name": "eth0",
    }


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")


def _tar_folder(folder: Path, archive: Path) -> None:
    """Archive the folder's contents at the archive root, as SageMaker packs /opt/ml/model."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
