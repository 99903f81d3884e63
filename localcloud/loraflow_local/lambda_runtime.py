"""In-process Lambda runtime: imports each function's handler and invokes it like the Python runtime would.

Several functions share one process, so each one's environment variables are overlaid on `os.environ`
only while it cold-starts (import + first invocation, when handlers read their settings: the contract in
docs/architecture.md). Warm invocations never touch `os.environ`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from loraflow_local.cloud_logs import LogShipper, lambda_destination
from loraflow_local.log_capture import LineSink, captured

LOG = logging.getLogger(__name__)

Handler = Callable[[Any, Any], Any]

# One process-wide lock: two cold starts at once would each see the other's environment overlay.
_COLD_START_LOCK = threading.Lock()


@dataclass(frozen=True)
class FunctionSpec:
    """What the runtime needs to know about one deployed function (resolved from the template)."""

    name: str
    arn: str
    handler: str  # "package.module.function", as in the template's Handler
    code_paths: tuple[Path, ...]  # the CodeUri folder and the layers' folders, put on sys.path for the import
    environment: Mapping[str, str] = field(default_factory=dict)
    timeout_s: int = 3
    memory_mb: int = 128
    region: str = "us-east-1"


@dataclass(frozen=True)
class InvocationResult:
    payload: str  # JSON text, as Lambda returns it
    errored: bool


class LambdaContext:
    """The attributes of the Python runtime's context object that handlers and Powertools read."""

    function_version = "$LATEST"

    def __init__(self, spec: FunctionSpec, log_stream_name: str | None = None) -> None:
        self.function_name = spec.name
        self.invoked_function_arn = spec.arn
        self.memory_limit_in_mb = spec.memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{spec.name}"
        self.log_stream_name = log_stream_name or new_log_stream_name()
        self._deadline = time.monotonic() + spec.timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def new_log_stream_name() -> str:
    """Lambda's stream name for a new execution environment: `YYYY/MM/DD/[$LATEST]<32 hex>` (UTC date)."""
    return f"{time.strftime('%Y/%m/%d', time.gmtime())}/[$LATEST]{uuid.uuid4().hex}"


class LambdaRegistry:
    """Deployed functions by name; `invoke` runs one in the calling thread.

    With `logs` attached, each invocation's stdout/stderr (Powertools' JSON lines, prints) and Lambda's
    START/END/REPORT lines go to `/aws/lambda/<name>` (one stream per function, as one warm environment
    has) and to `<log_dir>/<name>.log`.
    """

    def __init__(self, logs: LogShipper | None = None, log_dir: Path | None = None) -> None:
        self._specs: dict[str, FunctionSpec] = {}
        self._handlers: dict[str, Handler] = {}
        self._streams: dict[str, str] = {}
        self._logs = logs
        self._log_dir = log_dir

    def register(self, spec: FunctionSpec) -> None:
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def code_paths(self) -> set[Path]:
        return {path for spec in self._specs.values() for path in spec.code_paths}

    def spec(self, name: str) -> FunctionSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no local handler registered for Lambda function {name!r}") from None

    def invoke(self, name: str, event: Any) -> InvocationResult:
        spec = self.spec(name)
        context = LambdaContext(spec, self._streams.setdefault(name, new_log_stream_name()))
        emit = self._log_emitter(spec, context.log_stream_name)
        request_id = context.aws_request_id
        emit(f"START RequestId: {request_id} Version: $LATEST")
        started = time.monotonic()
        with captured(LineSink(emit)) if self._logs is not None else nullcontext():
            try:
                result = self._call(spec, event, context)
                payload, errored = json.dumps(result), False
            except Exception as exc:  # a handler error is the function's result, as on Lambda
                LOG.warning("function %s raised %s: %s", name, type(exc).__name__, exc)
                payload, errored = json.dumps(error_payload(exc)), True
                emit(_error_log_line(exc))
        elapsed = time.monotonic() - started
        emit(f"END RequestId: {request_id}")
        emit(_report_line(request_id, elapsed, spec.memory_mb))
        if elapsed > spec.timeout_s:
            # Not enforced: killing a thread is unsafe; a Lambda this slow would time out on AWS.
            LOG.warning("function %s ran %.1f s, over its %d s Timeout", name, elapsed, spec.timeout_s)
        return InvocationResult(payload=payload, errored=errored)

    def _log_emitter(self, spec: FunctionSpec, stream: str) -> Callable[[str], None]:
        if self._logs is None:
            return lambda line: None
        return self._logs.line_writer(lambda_destination(spec.name, stream, self._log_dir))

    def _call(self, spec: FunctionSpec, event: Any, context: LambdaContext) -> Any:
        handler = self._handlers.get(spec.name)
        if handler is not None:
            return handler(event, context)
        with _COLD_START_LOCK, _overlaid_environ(lambda_environment(spec)):
            handler = self._handlers.get(spec.name) or _import_handler(spec)
            result = handler(event, context)
            self._handlers[spec.name] = handler
            return result


def _error_log_line(exc: BaseException) -> str:
    """What the Python runtime logs for an unhandled exception: one event, the traceback included."""
    trace = "".join(traceback.format_exception(exc)).rstrip()
    return f"[ERROR] {type(exc).__name__}: {exc}\n{trace}"


def _report_line(request_id: str, elapsed_s: float, memory_mb: int) -> str:
    duration_ms = elapsed_s * 1000
    return (
        f"REPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
        f"Billed Duration: {math.ceil(duration_ms)} ms\tMemory Size: {memory_mb} MB"
    )


def error_payload(exc: BaseException) -> dict[str, Any]:
    """The Python runtime's error shape; Step Functions uses `errorType` as the error name."""
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "stackTrace": traceback.format_tb(exc.__traceback__),
    }


def lambda_environment(spec: FunctionSpec) -> dict[str, str]:
    """The runtime's reserved variables, then the function's own (which may not override the former)."""
    reserved = {
        "AWS_LAMBDA_FUNCTION_NAME": spec.name,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
        "AWS_REGION": spec.region,
        "AWS_DEFAULT_REGION": spec.region,
        "_HANDLER": spec.handler,
    }
    return {**spec.environment, **reserved}


@contextmanager
def _overlaid_environ(overlay: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in overlay}
    os.environ.update(overlay)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_handler(spec: FunctionSpec) -> Handler:
    module_name, _, attribute = spec.handler.rpartition(".")
    if not module_name:
        raise ValueError(f"function {spec.name}: Handler {spec.handler!r} is not 'module.function'")
    for folder in reversed(spec.code_paths):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    module = importlib.import_module(module_name)
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise ValueError(f"function {spec.name}: {module_name} has no callable {attribute!r}")
    return handler


class ModuleSandbox:
    """One local cloud's own copies of its functions' modules, as each Lambda sandbox has its own.

    Handlers cache settings and clients at cold start, so modules imported by an earlier cloud in this
    process (another moto port, other parameters) must not serve this one. `enter` sets aside every
    module loaded from the code folders; `exit` drops this cloud's copies and puts the old ones back.
    """

    def __init__(self, roots: Iterable[Path]) -> None:
        self._roots = [root.resolve() for root in roots]
        self._saved: dict[str, ModuleType] = {}

    def enter(self) -> None:
        self._saved = self._take_modules()

    def exit(self) -> None:
        self._take_modules()
        sys.modules.update(self._saved)
        self._saved = {}

    def _take_modules(self) -> dict[str, ModuleType]:
        taken = {name: module for name, module in list(sys.modules.items()) if self._is_ours(module)}
        for name in taken:
            del sys.modules[name]
        return taken

    def _is_ours(self, module: ModuleType | None) -> bool:
        location = getattr(module, "__file__", None)  # the function packages are regular packages
        if not isinstance(location, str):
            return False
        path = Path(location).resolve()
        return any(path.is_relative_to(root) for root in self._roots)
