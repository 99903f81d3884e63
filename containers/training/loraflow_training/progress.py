"""``progress.json``: step, total steps, loss and ETA, for the job's API view while it trains.

The file lives in ``$SM_CHECKPOINT_DIR`` (SageMaker copies that folder to S3 during the run, where the
API reads it). Writes are atomic (a temp file renamed over the old one), so a reader or the S3 copy
never sees half a file. Updates are throttled to one per ``min_interval_s`` (15 s by default), the first
and last steps always written. The API promises an update at least every 30 s while steps advance, so
the interval may not exceed ``MAX_INTERVAL_S``: with ``update`` called after every step (or at least
every ``min_interval_s``), the gap between writes stays under 30 s unless one step takes longer.
The rate behind the ETA is a moving average over the last ``window_s`` seconds of updates.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from loraflow_shared.contracts import LossPoint, TrainingProgress, merge_loss_curve

MAX_INTERVAL_S = 30.0
DEFAULT_WINDOW_S = 300.0

logger = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ProgressReporter:
    """Writes ``TrainingProgress`` JSON to ``path``; ``clock`` (seconds) and ``now`` are injectable."""

    def __init__(
        self,
        path: Path,
        total_steps: int,
        min_interval_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = _utc_now,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        if not 0 <= min_interval_s <= MAX_INTERVAL_S:
            raise ValueError(
                f"min_interval_s must be between 0 and {MAX_INTERVAL_S:g} (the API shows progress at "
                f"least every {MAX_INTERVAL_S:g} s), got {min_interval_s}"
            )
        if total_steps < 0 or window_s <= 0:
            raise ValueError(f"need total_steps >= 0 and window_s > 0, got {total_steps} and {window_s}")
        self.path = path
        self.total_steps = total_steps
        self.min_interval_s = min_interval_s
        self.window_s = window_s
        self._clock = clock
        self._now = now
        self._samples: deque[tuple[float, int]] = deque()  # (clock, step) of recent updates
        self._last_write: float | None = None
        self.last: TrainingProgress | None = None  # the last progress written

    def update(self, step: int, loss: float | None, curve: Sequence[LossPoint] = ()) -> bool:
        """Record that ``step`` is done; write the file when due. True when it was written.

        ``loss`` may be None (not read this step: the previous one is kept) or non-finite (written as null).
        ``curve``: the interval means so far, written merged down to ``MAX_LOSS_CURVE_POINTS``.
        A failed write is logged, never raised: progress is for display, training goes on.
        """
        now = self._clock()
        self._record(now, step)
        due = (
            self._last_write is None
            or step >= self.total_steps
            or now - self._last_write >= self.min_interval_s
        )
        if not due:
            return False
        progress = self._progress(step, loss, now).model_copy(
            update={"loss_curve": merge_loss_curve([(point.step, point.loss) for point in curve])}
        )
        try:
            _write_atomically(self.path, progress.model_dump_json().encode())
        except OSError as exc:
            logger.warning("could not write %s: %s", self.path, exc)
            return False
        self._last_write, self.last = now, progress
        return True

    def steps_per_second(self) -> float | None:
        """Steps per second over the window; None until two updates are apart in time."""
        if len(self._samples) < 2:
            return None
        (start_time, start_step), (end_time, end_step) = self._samples[0], self._samples[-1]
        if end_time <= start_time:
            return None
        return max(0, end_step - start_step) / (end_time - start_time)

    def _record(self, now: float, step: int) -> None:
        if self._samples and step < self._samples[-1][1]:
            self._samples.clear()  # the step went back (training restarted): old rates mean nothing
        self._samples.append((now, step))
        # Keep one sample older than the window, so the average spans the whole window.
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def _progress(self, step: int, loss: float | None, now: float) -> TrainingProgress:
        rate = self.steps_per_second()
        remaining = max(0, self.total_steps - step)
        if remaining == 0:
            eta: float | None = 0.0
        else:
            eta = round(remaining / rate, 1) if rate else None
        if loss is None and self.last is not None:
            loss = self.last.loss
        return TrainingProgress(
            step=step,
            total_steps=self.total_steps,
            loss=loss if loss is not None and math.isfinite(loss) else None,
            eta_seconds=eta,
            steps_per_second=None if rate is None else float(f"{rate:.4g}"),
            updated_at=self._now().astimezone(UTC).isoformat(timespec="seconds"),
        )


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
