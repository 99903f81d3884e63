"""progress.json: throttled atomic writes with a moving-average ETA, on an injected clock."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from loraflow_shared.contracts import MAX_LOSS_CURVE_POINTS, LossPoint, TrainingProgress
from loraflow_training.progress import MAX_INTERVAL_S, ProgressReporter


class FakeClock:
    def __init__(self) -> None:
        self.seconds = 1000.0

    def __call__(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


def fixed_now() -> datetime:
    return datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))


def read(path: Path) -> TrainingProgress:
    return TrainingProgress.model_validate_json(path.read_bytes())


def reporter(tmp_path: Path, total: int, clock: FakeClock, interval: float = 15.0) -> ProgressReporter:
    return ProgressReporter(
        tmp_path / "progress.json", total, min_interval_s=interval, clock=clock, now=fixed_now
    )


def test_given_first_update_when_reported_then_file_has_every_field_and_no_eta_yet(tmp_path: Path) -> None:
    progress = reporter(tmp_path, 100, FakeClock())

    written = progress.update(1, 0.25)

    document = json.loads((tmp_path / "progress.json").read_text())
    assert written
    assert document == {
        "step": 1,
        "total_steps": 100,
        "loss": 0.25,
        "eta_seconds": None,
        "steps_per_second": None,
        "updated_at": "2025-01-02T01:04:05+00:00",  # converted to UTC
        "loss_curve": [],
    }


def test_given_a_long_loss_curve_when_reported_then_written_merged_to_the_bounded_number_of_points(
    tmp_path: Path,
) -> None:
    progress = reporter(tmp_path, 10_000, FakeClock())
    curve = [LossPoint(step=10 * (i + 1), loss=1.0 if i < 500 else 0.5) for i in range(1000)]

    progress.update(10_000, 0.5, curve)

    written = read(tmp_path / "progress.json").loss_curve
    assert len(written) == MAX_LOSS_CURVE_POINTS
    assert written[0].loss == 1.0 and written[-1] == LossPoint(step=10_000, loss=0.5)
    assert [point.step for point in written] == sorted({point.step for point in written})


def test_given_updates_within_the_interval_when_reported_then_written_once_per_interval(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    progress = reporter(tmp_path, 1000, clock)
    writes = []

    for step in range(1, 61):  # one step per second for a minute
        if progress.update(step, 0.1):
            writes.append(step)
        clock.advance(1.0)

    assert writes == [1, 16, 31, 46]
    assert read(tmp_path / "progress.json").step == 46


def test_given_steady_pace_when_reported_then_rate_and_eta_follow_it(tmp_path: Path) -> None:
    clock = FakeClock()
    progress = reporter(tmp_path, 100, clock)

    for step in range(1, 41):
        progress.update(step, 0.5)
        clock.advance(0.5)  # two steps per second

    written = read(tmp_path / "progress.json")
    assert written.step == 31
    assert written.steps_per_second == pytest.approx(2.0)
    assert written.eta_seconds == pytest.approx((100 - 31) / 2.0)


def test_given_pace_change_when_window_passes_then_rate_reflects_only_recent_steps(tmp_path: Path) -> None:
    clock = FakeClock()
    progress = ProgressReporter(tmp_path / "p.json", 10_000, clock=clock, window_s=60)
    step = 0
    for _ in range(100):  # slow: 1 step per second
        step += 1
        progress.update(step, None)
        clock.advance(1.0)
    for _ in range(300):  # fast: 4 steps per second, well past the 60 s window
        step += 1
        progress.update(step, None)
        clock.advance(0.25)

    assert progress.steps_per_second() == pytest.approx(4.0, rel=0.02)


def test_given_last_step_when_reported_then_written_at_once_with_zero_eta(tmp_path: Path) -> None:
    clock = FakeClock()
    progress = reporter(tmp_path, 10, clock)
    for step in range(1, 10):
        progress.update(step, 0.3)
        clock.advance(0.1)

    written = progress.update(10, 0.2)

    final = read(tmp_path / "progress.json")
    assert written and (final.step, final.eta_seconds, final.loss) == (10, 0.0, 0.2)


def test_given_slow_steps_when_reported_then_no_gap_between_writes_reaches_30_seconds(tmp_path: Path) -> None:
    clock = FakeClock()
    progress = reporter(tmp_path, 10_000, clock)
    write_times = []

    for step in range(1, 60):
        if progress.update(step, 1.0):
            write_times.append(clock())
        clock.advance(7.3)  # steps slower than a few per interval

    gaps = [later - earlier for earlier, later in itertools.pairwise(write_times)]
    assert max(gaps) < MAX_INTERVAL_S


@pytest.mark.parametrize("interval", [30.5, -1.0])
def test_given_interval_outside_the_promise_when_created_then_refused(
    tmp_path: Path, interval: float
) -> None:
    with pytest.raises(ValueError, match="at least every 30 s"):
        ProgressReporter(tmp_path / "progress.json", 10, min_interval_s=interval)


def test_given_unknown_or_non_finite_loss_when_reported_then_last_known_or_null(tmp_path: Path) -> None:
    progress = ProgressReporter(tmp_path / "progress.json", 10, min_interval_s=0, clock=FakeClock())

    progress.update(1, 0.4)
    progress.update(2, None)
    kept = read(tmp_path / "progress.json").loss
    progress.update(3, float("nan"))
    nan = json.loads((tmp_path / "progress.json").read_text())["loss"]

    assert (kept, nan) == (0.4, None)


def test_given_writes_when_done_then_no_temporary_file_is_left(tmp_path: Path) -> None:
    progress = ProgressReporter(tmp_path / "progress.json", 3, min_interval_s=0, clock=FakeClock())

    for step in (1, 2, 3):
        progress.update(step, 0.1)

    assert [path.name for path in tmp_path.iterdir()] == ["progress.json"]


def test_given_unwritable_location_when_reported_then_training_goes_on_without_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    progress = ProgressReporter(blocker / "progress.json", 10, clock=FakeClock())

    written = progress.update(1, 0.1)

    assert not written and progress.last is None
    assert "could not write" in caplog.text


def test_given_real_clock_when_reported_then_updated_at_is_current_utc(tmp_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    ProgressReporter(tmp_path / "progress.json", 5).update(1, 0.1)

    stamp = datetime.fromisoformat(read(tmp_path / "progress.json").updated_at)

    assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
    assert before <= stamp <= datetime.now(UTC)
