"""In-process Lambda runtime: imports each function's handler and invokes it like the Python runtime would.

Several functions share one process, so each one's environment variables are overlaid on `os.environ`
only while it cold-starts (import + first invocation, when handlers read their settings: the contract in
docs/architecture.md). Warm invocations never touch `os.environ`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

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

    def __init__(self, spec: FunctionSpec) -> None:
        self.function_name = spec.name
        self.invoked_function_arn = spec.arn
        self.memory_limit_in_mb = spec.memory_mb
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{spec.name}"
        self.log_stream_name = f"{time.strftime('%Y/%m/%d')}/[$LATEST]{uuid.uuid4().hex}"
        self._deadline = time.monotonic() + spec.timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class LambdaRegistry:
    """Deployed functions by name; `invoke` runs one in the calling thread."""

    def __init__(self) -> None:
        self._specs: dict[str, FunctionSpec] = {}
        self._handlers: dict[str, Handler] = {}

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
        started = time.monotonic()
        try:
            result = self._call(spec, event)
            payload, errored = json.dumps(result), False
        except Exception as exc:  # a handler error is the function's result, as on Lambda
            LOG.warning("function %s raised %s: %s", name, type(exc).__name__, exc)
            payload, errored = json.dumps(error_payload(exc)), True
        elapsed = time.monotonic() - started
        if elapsed > spec.timeout_s:
            # Not enforced: killing a thread is unsafe; a Lambda this slow would time out on AWS.
            LOG.warning("function %s ran %.1f s, over its %d s Timeout", name, elapsed, spec.timeout_s)
        return InvocationResult(payload=payload, errored=errored)

    def _call(self, spec: FunctionSpec, event: Any) -> Any:
        handler = self._handlers.get(spec.name)
        if handler is not None:
            return handler(event, LambdaContext(spec))
        with _COLD_START_LOCK, _overlaid_environ(lambda_environment(spec)):
            handler = self._handlers.get(spec.name) or _import_handler(spec)
            result = handler(event, LambdaContext(spec))
            self._handlers[spec.name] = handler
            return result


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
