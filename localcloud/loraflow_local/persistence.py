"""A local cloud that keeps its state across restarts (`loraflow local up --state-dir DIR`).

Saved under `<state>/saved/`: `state.json` (the cloud's ports and API key values, then one section per
service) and `s3/` (object contents, by SHA-256). A save runs through the same APIs users call, one seam
per service (`ServiceSnapshot`: S3 in `persistence_s3`, DynamoDB, SQS and SNS in `persistence_services`).
The state file is replaced atomically, so a crash mid-save leaves the previous save whole; `PeriodicSaver`
saves every few seconds so a `kill -9` loses little, and a clean stop saves once more at the end.
What is not kept: queue messages, Step Functions executions, SageMaker jobs (their checkpoints in S3 are),
CloudWatch Logs in moto (the files under `<state>/logs` and the containers' workdirs are).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loraflow_local.persistence_s3 import S3Snapshot
from loraflow_local.persistence_services import Baseline, DynamoDbSnapshot, SnsSnapshot, SqsSnapshot

LOG = logging.getLogger(__name__)

STATE_VERSION = 1
DEFAULT_SAVE_INTERVAL_S = 15.0


class ServiceSnapshot(Protocol):
    """One service's part of the saved state (a JSON-ready section of state.json)."""

    name: str

    def save(self, previous: Mapping[str, Any] | None) -> dict[str, Any]: ...

    def restore(self, saved: Mapping[str, Any]) -> dict[str, int]:
        """Recreate what the section describes; return counts of what was restored, by kind."""
        ...

    def committed(self, saved: Mapping[str, Any]) -> None:
        """Called once the state file holding `saved` is written (to drop what it no longer needs)."""
        ...


@dataclass(frozen=True)
class CloudSettings:
    """What makes a restarted cloud look the same from outside: its ports and API key values."""

    aws_port: int | None = None
    api_port: int | None = None
    api_keys: Mapping[str, str] = field(default_factory=dict)  # ApiKey logical id → value

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> CloudSettings:
        return cls(value.get("aws_port"), value.get("api_port"), dict(value.get("api_keys") or {}))


@dataclass(frozen=True)
class RestoreReport:
    """What a start found in the saved state; `restored` is False for a first (or `--fresh`) start."""

    restored: bool
    saved_at: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)  # e.g. objects, items, subscriptions


class StateStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._last: dict[str, Any] | None = None

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    @property
    def blob_dir(self) -> Path:
        return self.folder / "s3"

    def discard(self) -> None:
        """Forget everything saved (`--fresh`)."""
        with self._lock:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._last = None

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it is from another format version)."""
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        if state.get("version") != STATE_VERSION:
            LOG.warning("ignoring %s: format version %s, not %s", self.state_file, state.get("version"), 1)
            return None
        self._last = state
        return state

    def cloud_settings(self) -> CloudSettings:
        return CloudSettings.from_json((self._last or {}).get("cloud") or {})

    def restore(self, snapshots: Sequence[ServiceSnapshot]) -> RestoreReport:
        """Recreate each service's saved section, in the order given."""
        if self._last is None:
            return RestoreReport(restored=False)
        sections = self._last.get("services") or {}
        counts: dict[str, int] = {}
        for snapshot in snapshots:
            if snapshot.name in sections:
                counts.update(snapshot.restore(sections[snapshot.name]))
        return RestoreReport(restored=True, saved_at=self._last.get("saved_at"), counts=counts)

    def save(self, cloud: CloudSettings, snapshots: Sequence[ServiceSnapshot]) -> None:
        with self._lock:
            previous = (self._last or {}).get("services") or {}
            sections = {snapshot.name: snapshot.save(previous.get(snapshot.name)) for snapshot in snapshots}
            state = {
                "version": STATE_VERSION,
                "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "cloud": {
                    "aws_port": cloud.aws_port,
                    "api_port": cloud.api_port,
                    "api_keys": dict(cloud.api_keys),
                },
                "services": sections,
            }
            write_atomically(self.state_file, json.dumps(state, indent=1, sort_keys=True))
            self._last = state
            for snapshot in snapshots:
                snapshot.committed(sections[snapshot.name])


class PeriodicSaver:
    """Calls `save` every `interval_s` in a background thread; a failed save is logged and retried later."""

    def __init__(self, save: Callable[[], None], interval_s: float = DEFAULT_SAVE_INTERVAL_S) -> None:
        self._save = save
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="state-saver", daemon=True)

    def start(self) -> None:
        if self._interval_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._save()
            except Exception:  # the next round (or the final save on stop) tries again
                LOG.warning("saving the local cloud's state failed", exc_info=True)


def service_snapshots(client: Callable[[str], Any], blob_dir: Path, region: str) -> list[ServiceSnapshot]:
    """The saved services, in restore order (queues before the subscriptions naming them). Call it right
    after provisioning: what SQS and SNS hold then is the template's, provisioned anew at each start."""
    baseline = Baseline.capture(client("sqs"), client("sns"))
    return [
        S3Snapshot(client("s3"), blob_dir, region),
        DynamoDbSnapshot(client("dynamodb")),
        SqsSnapshot(client("sqs"), baseline),
        SnsSnapshot(client("sns"), baseline),
    ]


class PortInUseError(RuntimeError):
    pass


def port_to_use(requested: int, saved: int | None, option: str) -> int:
    """The requested port (it must be free), else the saved one if it is free, else any free one (0)."""
    if requested:
        if not port_is_free(requested):
            raise PortInUseError(f"{option} {requested}: the port is in use")
        return requested
    return saved if saved and port_is_free(saved) else 0


def port_is_free(port: int | None) -> bool:
    """Whether 127.0.0.1:port can be listened on now (as the servers bind: with SO_REUSEADDR)."""
    if not port:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
