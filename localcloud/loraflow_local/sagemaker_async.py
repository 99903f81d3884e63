"""A SageMaker asynchronous inference endpoint run as a local process.

InvokeEndpointAsync returns at once; a worker thread (MaxConcurrentInvocationsPerInstance of them) reads
the request from `InputLocation`, POSTs it to the model server's `/invocations`, writes the response to
`<S3OutputPath>/<inference-id>.out` (or the error to `<S3FailurePath>/<inference-id>-error.out`) and
publishes SageMaker's `InferenceResult` notification to the success or error topic. The server process
(`python -m loraflow_inference serve`) starts on the first request and must answer `GET /ping` first.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from loraflow_local.cloud_logs import LogShipper, endpoint_destination
from loraflow_local.local_process import end_process, start_process
from loraflow_local.log_capture import FileTail
from loraflow_local.s3_util import join_s3_uri, split_s3_uri

LOG = logging.getLogger(__name__)

DEFAULT_SERVE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "loraflow_inference", "serve")
DEFAULT_INVOCATION_TIMEOUT_S = 900  # InvokeEndpointAsync's default InvocationTimeoutSeconds
STARTUP_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class AsyncEndpointConfig:
    """An endpoint config's AsyncInferenceConfig, plus the model container's environment."""

    output_path: str
    failure_path: str | None = None
    success_topic: str | None = None
    error_topic: str | None = None
    max_concurrency: int = 1
    model_environment: Mapping[str, str] = field(default_factory=dict)
    variant_name: str = "AllTraffic"  # the production variant: its instances' log streams are named after it

    @classmethod
    def from_api(
        cls, async_config: Mapping[str, Any], model_environment: Mapping[str, str], variant_name: str
    ) -> AsyncEndpointConfig:
        output = async_config.get("OutputConfig") or {}
        notifications = output.get("NotificationConfig") or {}
        client = async_config.get("ClientConfig") or {}
        return cls(
            output_path=output["S3OutputPath"],
            failure_path=output.get("S3FailurePath"),
            success_topic=notifications.get("SuccessTopic"),
            error_topic=notifications.get("ErrorTopic"),
            max_concurrency=int(client.get("MaxConcurrentInvocationsPerInstance", 1)),
            model_environment=dict(model_environment),
            variant_name=variant_name,
        )


@dataclass(frozen=True)
class AsyncRequest:
    inference_id: str
    input_location: str
    content_type: str = "application/octet-stream"
    accept: str = "*/*"
    invocation_timeout_s: int = DEFAULT_INVOCATION_TIMEOUT_S
    received: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))


@dataclass(frozen=True)
class Accepted:
    """InvokeEndpointAsync's response."""

    inference_id: str
    output_location: str
    failure_location: str | None


class InferenceFailedError(Exception):
    """The request could not be answered; the message becomes the notification's failureReason."""


class AsyncEndpoint:
    def __init__(
        self,
        name: str,
        config: AsyncEndpointConfig,
        workdir: Path,
        container_env: Mapping[str, str],
        region: str,
        command: Sequence[str] = DEFAULT_SERVE_COMMAND,
        logs: LogShipper | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.workdir = workdir
        self._container_env = dict(container_env)
        self._region = region
        self._command = list(command)
        self._pool = ThreadPoolExecutor(max(1, config.max_concurrency), thread_name_prefix=f"endpoint-{name}")
        self._start_lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._logs = logs
        self._tail: FileTail | None = None
        self.instance_id = f"i-{uuid.uuid4().hex[:17]}"  # names the log stream, as an instance's id does

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def submit(self, request: AsyncRequest) -> Accepted:
        output = join_s3_uri(self.config.output_path, f"{request.inference_id}.out")
        failure = (
            join_s3_uri(self.config.failure_path, f"{request.inference_id}-error.out")
            if self.config.failure_path
            else None
        )
        self._pool.submit(self._process_request, request, output, failure)
        return Accepted(request.inference_id, output, failure)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._process is not None:
            end_process(self._process, 10)
        if self._tail is not None:
            self._tail.stop()

    def _process_request(self, request: AsyncRequest, output: str, failure: str | None) -> None:
        try:
            status, content_type, body = self._invoke(request)
        except Exception as exc:  # the failure is reported through the error topic, as SageMaker does
            LOG.warning("endpoint %s: inference %s failed: %s", self.name, request.inference_id, exc)
            self._report_failure(request, failure, str(exc))
            return
        if status != 200:
            text = body.decode("utf-8", errors="replace")
            reason = f"ClientError: Received server error ({status}) from model with message {text[:800]!r}"
            self._report_failure(request, failure, reason, body, content_type)
            return
        try:
            bucket, key = split_s3_uri(output)
            self._s3().put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        except Exception as exc:
            self._report_failure(request, failure, f"ClientError: could not write {output}: {exc}")
            return
        notification = success_notification(self.name, self._region, request, output, content_type)
        self._publish(self.config.success_topic, notification)

    def _invoke(self, request: AsyncRequest) -> tuple[int, str, bytes]:
        port = self._ensure_server()
        bucket, key = split_s3_uri(request.input_location)
        payload = self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        http_request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=payload,
            method="POST",
            headers={"Content-Type": request.content_type, "Accept": request.accept},
        )
        try:
            with urllib.request.urlopen(http_request, timeout=request.invocation_timeout_s) as response:
                content_type = response.headers.get("Content-Type", "application/json")
                return response.status, content_type, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type", "text/plain"), error.read()

    def _ensure_server(self) -> int:
        with self._start_lock:
            if self._process is not None and self._process.poll() is None and self._port is not None:
                return self._port
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._port = _free_port()
            command = [*self._command, "--port", str(self._port), "--host", "127.0.0.1"]
            env = {**os.environ, **self._container_env, **dict(self.config.model_environment)}
            self._start_log_tail()
            with self.log_path.open("ab") as log:
                self._process = start_process(command, self.workdir, env, log)
            _wait_for_ping(self._process, self._port, self.log_path)
            return self._port

    def _start_log_tail(self) -> None:
        """Ship the server's new log lines to `/aws/sagemaker/Endpoints/<name>`, `<variant>/<instance>`."""
        if self._logs is None or self._tail is not None:
            return
        destination = endpoint_destination(self.name, self.config.variant_name, self.instance_id)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._tail = FileTail(self.log_path, self._logs.line_writer(destination), offset)
        self._tail.start()

    def _report_failure(
        self,
        request: AsyncRequest,
        failure: str | None,
        reason: str,
        body: bytes | None = None,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        if failure is not None:
            try:
                bucket, key = split_s3_uri(failure)
                payload = body or reason.encode("utf-8")
                self._s3().put_object(Bucket=bucket, Key=key, Body=payload, ContentType=content_type)
            except Exception:
                LOG.exception("endpoint %s: could not write the failure file %s", self.name, failure)
        notification = error_notification(self.name, self._region, request, failure, reason, content_type)
        self._publish(self.config.error_topic, notification)

    def _publish(self, topic_arn: str | None, notification: Mapping[str, Any]) -> None:
        if not topic_arn:
            return
        try:
            sns = boto3.client("sns", region_name=self._region)
            sns.publish(TopicArn=topic_arn, Message=json.dumps(notification))
        except Exception:  # nobody else would see it: the notification is this thread's only output
            LOG.exception("endpoint %s: could not publish to %s", self.name, topic_arn)

    def _s3(self) -> Any:
        return boto3.client("s3", region_name=self._region)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_ping(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InferenceFailedError(
                f"ModelError: the model server exited with code {process.returncode} before answering /ping; "
                f"see {log_path}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    process.kill()
    raise InferenceFailedError(f"ModelError: no /ping answer within {STARTUP_TIMEOUT_S:.0f}s; see {log_path}")


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _base_notification(endpoint: str, region: str, request: AsyncRequest, status: str) -> dict[str, Any]:
    return {
        "awsRegion": region,
        "eventTime": _iso(datetime.datetime.now(datetime.UTC)),
        "receivedTime": _iso(request.received),
        "invocationStatus": status,
        "requestParameters": {
            "contentType": request.content_type,
            "endpointName": endpoint,
            "inputLocation": request.input_location,
        },
        "inferenceId": request.inference_id,
        "eventVersion": "1.0",
        "eventSource": "aws:sagemaker",
        "eventName": "InferenceResult",
    }


def success_notification(
    endpoint: str, region: str, request: AsyncRequest, output: str, content_type: str
) -> dict[str, Any]:
    """SageMaker's success notification (Developer Guide, "Check prediction results")."""
    notification = _base_notification(endpoint, region, request, "Completed")
    notification["responseParameters"] = {"contentType": content_type, "outputLocation": output}
    return notification


def error_notification(
    endpoint: str,
    region: str,
    request: AsyncRequest,
    failure: str | None,
    reason: str,
    content_type: str = "text/plain; charset=utf-8",
) -> dict[str, Any]:
    """SageMaker's error notification: `failureReason`, and with an S3FailurePath
    `responseParameters.failureLocation` (where the model's error response was written)."""
    notification = _base_notification(endpoint, region, request, "Failed")
    notification["failureReason"] = reason
    if failure is not None:
        notification["responseParameters"] = {"contentType": content_type, "failureLocation": failure}
    return notification
