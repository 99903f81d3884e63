from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ping(port: int) -> dict[str, str] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as response:
            return json.loads(response.read())
    except OSError:
        return None


def test_given_serve_command_when_started_then_pings_ok_on_the_given_port(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "loraflow_inference", "serve", "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        deadline = time.monotonic() + 60
        while (answer := _ping(port)) is None and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
        assert answer == {"status": "ok"}, log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_given_unknown_command_when_started_then_exit_2() -> None:
    with pytest.raises(SystemExit) as caught:
        from loraflow_inference.__main__ import main

        main(["train"])

    assert caught.value.code == 2
