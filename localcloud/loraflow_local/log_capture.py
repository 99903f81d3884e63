"""Capturing log lines: an in-process Lambda invocation's stdout/stderr, and a local container's log file.

In-process handlers share `sys.stdout` (Powertools' Logger writes its JSON lines to the `sys.stdout` it
finds when it is built, at cold start). While invocations are captured, `sys.stdout` and `sys.stderr` are
`RoutedStream`s: a write goes to the console as before and, from a thread that is inside `captured()`,
also to that invocation's `LineSink`. Routing is by context variable, so invocations running at the same
time in other threads each get only their own lines (threads a handler starts itself are not captured).
"""

from __future__ import annotations

import codecs
import contextvars
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

_current: contextvars.ContextVar[LineSink | None] = contextvars.ContextVar("loraflow_log_sink", default=None)
_routed: dict[str, RoutedStream] = {}  # one per std stream for the life of the process
_route_lock = threading.Lock()
_STREAMS = ("stdout", "stderr")


class LineSink:
    """Collects text into lines; each complete line goes to `emit`."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._partial = ""

    def write(self, text: str) -> None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._emit(line.rstrip("\r"))

    def close(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = ""


class RoutedStream:
    """A std stream that also copies each write to the current context's sink."""

    def __init__(self, target: TextIO) -> None:
        self.target = target

    def write(self, text: str) -> int:
        sink = _current.get()
        if sink is not None:
            sink.write(text)
        try:
            return self.target.write(text)
        except ValueError:  # the stream it wrapped was closed since (a test's capture buffer)
            return len(text)

    def flush(self) -> None:
        with suppress(ValueError):
            self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


def route_std_streams() -> None:
    """Make `sys.stdout`/`sys.stderr` routed streams (again, if something replaced them meanwhile)."""
    with _route_lock:
        for name in _STREAMS:
            current = getattr(sys, name)
            if isinstance(current, RoutedStream):
                continue
            routed = _routed.setdefault(name, RoutedStream(current))
            routed.target = current
            setattr(sys, name, routed)


def unroute_std_streams() -> None:
    """Put the wrapped streams back (handlers that kept a routed stream still write through it)."""
    with _route_lock:
        for name in _STREAMS:
            current = getattr(sys, name)
            if isinstance(current, RoutedStream):
                setattr(sys, name, current.target)


@contextmanager
def captured(sink: LineSink) -> Iterator[None]:
    """Copy what this thread writes to stdout/stderr into `sink` while the block runs."""
    route_std_streams()
    token = _current.set(sink)
    try:
        yield
    finally:
        _current.reset(token)
        sink.close()


class FileTail:
    """Follows a growing log file from `offset` and hands each new line to `on_line` (every `interval_s`)."""

    def __init__(
        self, path: Path, on_line: Callable[[str], None], offset: int = 0, interval_s: float = 0.5
    ) -> None:
        self._path = path
        self._offset = offset
        self._sink = LineSink(on_line)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # reads may split a character
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"tail-{path.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Read what is left, then stop."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self._read()
        self._read()
        self._sink.write(self._decoder.decode(b"", final=True))
        self._sink.close()

    def _read(self) -> None:
        try:
            with self._path.open("rb") as file:
                file.seek(self._offset)
                data = file.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        if data:
            self._sink.write(self._decoder.decode(data))
