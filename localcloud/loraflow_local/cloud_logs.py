"""Log lines where users look: CloudWatch Logs in moto (`aws logs tail`) and, optionally, a file on disk.

`LogShipper.emit` only enqueues; one background thread writes the files and sends the lines to moto with
PutLogEvents in batches, so a Lambda invocation or a training run is never slowed by it. Groups and
streams are created on first use, named as on AWS by the callers:
- `/aws/lambda/<function>`, stream `YYYY/MM/DD/[$LATEST]<hex>` (one per function environment);
- `/aws/sagemaker/TrainingJobs`, stream `<training-job>/algo-1-<epoch-seconds>`;
- `/aws/sagemaker/Endpoints/<endpoint>`, stream `<variant>/<instance-id>`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

LOG = logging.getLogger(__name__)

# PutLogEvents limits: 10,000 events and 1,048,576 bytes per call, each event counted as its UTF-8 size
# plus 26 bytes; one event at most 256 KiB.
MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD_BYTES = 26
MAX_EVENT_BYTES = 262_144 - EVENT_OVERHEAD_BYTES
TRAINING_JOBS_GROUP = "/aws/sagemaker/TrainingJobs"


@dataclass(frozen=True)
class LogDestination:
    group: str
    stream: str
    file: Path | None = None  # also appended to, one line per event


@dataclass(frozen=True)
class _Event:
    destination: LogDestination
    message: str
    timestamp_ms: int


@dataclass(frozen=True)
class _Flush:
    done: threading.Event


def lambda_destination(function_name: str, stream: str, log_dir: Path | None) -> LogDestination:
    file = log_dir / f"{function_name}.log" if log_dir is not None else None
    return LogDestination(f"/aws/lambda/{function_name}", stream, file)


def training_destination(job_name: str, started_epoch_s: int) -> LogDestination:
    return LogDestination(TRAINING_JOBS_GROUP, f"{job_name}/algo-1-{started_epoch_s}")


def endpoint_destination(endpoint_name: str, variant: str, instance_id: str) -> LogDestination:
    return LogDestination(f"/aws/sagemaker/Endpoints/{endpoint_name}", f"{variant}/{instance_id}")


class LogShipper:
    def __init__(self, region: str, endpoint_url: str | None = None, interval_s: float = 0.5) -> None:
        self._region = region
        self._endpoint_url = endpoint_url
        self._interval_s = interval_s
        self._queue: queue.SimpleQueue[_Event | _Flush | None] = queue.SimpleQueue()
        self._known: set[tuple[str, str]] = set()  # (group, stream) created in moto
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._warned = False

    def emit(self, destination: LogDestination, message: str, timestamp_ms: int | None = None) -> None:
        stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self._ensure_thread()
        self._queue.put(_Event(destination, message, stamp))

    def line_writer(self, destination: LogDestination) -> Callable[[str], None]:
        return lambda line: self.emit(destination, line)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything emitted so far is written and sent; False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(_Flush(done))
        return done.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then end the thread (a later `emit` starts a new one)."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="log-shipper", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            batch, flushes, stopping = self._drain()
            if batch:
                self._write(batch)
            for flush in flushes:
                flush.done.set()
            if stopping:
                return

    def _drain(self) -> tuple[list[_Event], list[_Flush], bool]:
        """Block for the first item, then take whatever else arrives within the interval."""
        batch: list[_Event] = []
        flushes: list[_Flush] = []
        item = self._queue.get()
        deadline = time.monotonic() + self._interval_s
        while True:
            if item is None:
                return batch, flushes, True
            if isinstance(item, _Flush):
                flushes.append(item)
                return batch, flushes, False
            batch.append(item)
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, flushes, False

    def _write(self, batch: list[_Event]) -> None:
        by_destination: dict[LogDestination, list[_Event]] = {}
        for event in batch:
            by_destination.setdefault(event.destination, []).append(event)
        for destination, events in by_destination.items():
            if destination.file is not None:
                _append_lines(destination.file, [event.message for event in events])
            try:
                self._put(destination, events)
            except (BotoCoreError, ClientError) as exc:  # moto gone or refusing: the file has them
                if not self._warned:
                    LOG.warning("could not send log lines to %s: %s", destination.group, exc)
                    self._warned = True

    def _put(self, destination: LogDestination, events: list[_Event]) -> None:
        logs = self._logs()
        key = (destination.group, destination.stream)
        if key not in self._known:
            create_ignoring_existing(logs.create_log_group, logGroupName=destination.group)
            create_ignoring_existing(
                logs.create_log_stream, logGroupName=destination.group, logStreamName=destination.stream
            )
            self._known.add(key)
        ordered = sorted(events, key=lambda event: event.timestamp_ms)
        for chunk in _chunks([(e.timestamp_ms, _truncate(e.message)) for e in ordered]):
            logs.put_log_events(
                logGroupName=destination.group,
                logStreamName=destination.stream,
                logEvents=[{"timestamp": stamp, "message": message} for stamp, message in chunk],
            )

    def _logs(self) -> Any:
        if self._client is None:
            self._client = boto3.client("logs", region_name=self._region, endpoint_url=self._endpoint_url)
        return self._client


def create_ignoring_existing(create: Callable[..., Any], **kwargs: str) -> None:
    """A CloudWatch Logs create call where "already exists" is success (log groups and streams)."""
    try:
        create(**kwargs)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ResourceAlreadyExistsException":
            raise


def _truncate(message: str) -> str:
    encoded = message.encode("utf-8")
    if len(encoded) <= MAX_EVENT_BYTES:
        return message or " "  # CloudWatch refuses empty messages
    return encoded[:MAX_EVENT_BYTES].decode("utf-8", errors="ignore")


def _chunks(events: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    chunks: list[list[tuple[int, str]]] = [[]]
    size = 0
    for event in events:
        event_size = len(event[1].encode("utf-8")) + EVENT_OVERHEAD_BYTES
        if len(chunks[-1]) >= MAX_BATCH_EVENTS or size + event_size > MAX_BATCH_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(event)
        size += event_size
    return [chunk for chunk in chunks if chunk]


def _append_lines(path: Path, lines: list[str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as file:
            file.writelines(line + "\n" for line in lines)
    except OSError as exc:
        LOG.warning("could not write %s: %s", path, exc)
