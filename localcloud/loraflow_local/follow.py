"""Follow a job through the API until it ends: a line per status change, a training progress bar (step of
total, loss, ETA from the trainer's reports), then the final job. Polls; never changes the job."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from loraflow_local.client import TERMINAL_STATUSES
from loraflow_local.jobs_api import JobsApi

POLL_S = 2.0


class FollowTimedOut(Exception):
    """The job had not ended when the follower's time was up (the job itself keeps running)."""


def follow_job(
    api: JobsApi,
    job_id: str,
    say: Callable[[str], None] = print,
    poll_s: float = POLL_S,
    progress: Callable[..., Any] = tqdm,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The job once it ends; `FollowTimedOut` if it has not within `timeout_s` (None: no limit)."""
    status, bar = None, None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job = api.job(job_id)
        if job["status"] != status:
            _close(bar, finished=status == "TRAINING")
            bar, status = None, job["status"]
            say(f"{job_id}: {status}{_reason(job)}")
        if job.get("progress"):
            bar = _show_progress(bar, job["progress"], progress)
        if status in TERMINAL_STATUSES:
            _close(bar, finished=False)
            return job
        if deadline is not None and time.monotonic() >= deadline:
            _close(bar, finished=False)
            raise FollowTimedOut(
                f"job {job_id} is still {status} after {timeout_s:.0f} s; it keeps running "
                f"(`loraflow show {job_id}` follows it, `loraflow cancel {job_id}` stops it)"
            )
        time.sleep(poll_s)


def _show_progress(bar: Any, report: dict[str, Any], progress: Callable[..., Any]) -> Any:
    if bar is None:
        bar = progress(total=report["total_steps"], desc="training", unit="step")
    bar.update(report["step"] - bar.n)
    details = {}
    if report.get("loss") is not None:
        details["loss"] = f"{report['loss']:.4f}"
    if report.get("eta_seconds") is not None:
        details["eta"] = f"{report['eta_seconds']:.0f}s"
    bar.set_postfix(details, refresh=True)
    return bar


def _close(bar: Any, finished: bool) -> None:
    """Close the bar; at its total when training `finished` (its last report may be a few steps short)."""
    if bar is None:
        return
    if finished:
        bar.update(bar.total - bar.n)
    bar.close()


def _reason(job: dict[str, Any]) -> str:
    """Why a job is waiting or ended badly, from its errors or its latest attempt."""
    errors = job.get("errors") or []
    if errors and job["status"] in ("REJECTED", "FAILED", "CANCELLED"):
        first = errors[0]
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        return f": {first['code']} {first.get('path') or ''} {first['message']}{more}".rstrip()
    attempts = job.get("attempts") or []
    if attempts and attempts[-1].get("waiting_reason"):
        return f" (waiting: {attempts[-1]['waiting_reason']})"
    return ""
