"""Local container processes (training jobs, model servers): started apart from the terminal, stopped as
SageMaker stops a container (SIGTERM, then SIGKILL after a grace period; SageMaker's is 120 s)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO


def start_process(
    command: Sequence[str], cwd: Path, env: Mapping[str, str], log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start `command` in its own session, stdout and stderr into `log`.

    Its own session: a Ctrl-C in the terminal running `loraflow local up` (SIGINT to the whole foreground
    process group) does not kill it mid-step; the local cloud ends it with SIGTERM so it can checkpoint.
    """
    return subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def end_process(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL the process and anything left in its process group."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
    _kill_group(process.pid)
    process.wait()


def _kill_group(pid: int) -> None:
    # The session leader's pid is its group id (start_new_session); nothing left in it is no error.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
