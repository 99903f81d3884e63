"""Following a job (`loraflow train --wait`, the demo): a line per status, the final job, and a time limit
that ends the follow (never the job) with a message saying how to go on."""

from __future__ import annotations

from typing import Any

import pytest
from loraflow_local.cli import main
from loraflow_local.follow import FollowTimedOut, follow_job


class _Api:
    """The jobs API as the follower sees it: `job(id)` answers each status in turn, then the last."""

    def __init__(self, *statuses: str) -> None:
        self._statuses = list(statuses)
        self.calls = 0

    def job(self, job_id: str) -> dict[str, Any]:
        self.calls += 1
        status = self._statuses.pop(0) if len(self._statuses) > 1 else self._statuses[0]
        return {"job_id": job_id, "status": status}


def test_given_a_job_that_ends_when_followed_then_a_line_per_status_and_the_final_job() -> None:
    said: list[str] = []

    job = follow_job(_Api("QUEUED", "QUEUED", "TRAINING", "COMPLETED"), "j-1", said.append, poll_s=0)  # type: ignore[arg-type]

    assert job["status"] == "COMPLETED"
    assert said == ["j-1: QUEUED", "j-1: TRAINING", "j-1: COMPLETED"]


def test_given_a_job_that_never_ends_when_followed_with_a_limit_then_timed_out_naming_how_to_go_on() -> None:
    api = _Api("TRAINING")

    with pytest.raises(FollowTimedOut) as timed_out:
        follow_job(api, "j-2", lambda _: None, poll_s=0.01, timeout_s=0.05)  # type: ignore[arg-type]

    assert "job j-2 is still TRAINING after 0 s" in str(timed_out.value)
    assert "loraflow cancel j-2" in str(timed_out.value)
    assert 2 <= api.calls < 50


@pytest.mark.parametrize("value", ["0", "-5", "nan", "soon"])
def test_given_a_timeout_that_is_not_a_positive_number_when_train_parsed_then_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "folder", "--wait", "--timeout", value])

    assert exited.value.code == 2
    assert f"{value!r} is not a positive number of seconds" in capsys.readouterr().err
