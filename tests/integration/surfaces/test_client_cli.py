"""The user's CLI against a running local cloud, as a user types it: `loraflow train --wait --download`,
`jobs`, `show`, `download`, `cancel`, `retry`, `doctor`; only the public API and the dataset bucket."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from loraflow_local.cli import main
from loraflow_local.sample_dataset import write_sample_dataset
from PIL import Image

pytestmark = pytest.mark.integration


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_json(out: str) -> Any:
    """The CLI's `--json` document in the captured output (the in-process cloud's functions log one-line
    JSON to the same stdout; the CLI's document starts with a line of its own, "{" or "[")."""
    lines = out.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() in ("{", "[", "[]"))
    document, _ = json.JSONDecoder().raw_decode("".join(lines[start:]))
    return document


def test_given_dataset_folder_when_trained_with_wait_then_completed_and_every_file_downloaded(
    trained: dict[str, object],
) -> None:
    out = trained["out"]
    assert isinstance(out, Path)
    assert trained["code"] == 0, trained["lines"]
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "COMPLETED" and job["dataset"] == trained["dataset"]
    names = {path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()}
    assert {"pytorch_lora_weights.safetensors", "demo-lora.safetensors", "training_report.json"} <= names
    assert {"contact-sheet.png", "previews/00.png", "previews/00-base.png"} <= names
    lines = trained["lines"]
    assert isinstance(lines, list)
    assert any("accepted" in line for line in lines) and any(line.endswith(": COMPLETED") for line in lines)


def test_given_same_folder_when_trained_again_then_nothing_uploaded_and_the_same_job(
    trained: dict[str, object], state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = json.loads((trained["out"] / "job.json").read_text())  # type: ignore[operator]

    folder, dataset = str(trained["folder"]), str(trained["dataset"])
    code, out, _ = run(capsys, "train", folder, "--dataset", dataset, "--local", str(state))

    assert code == 0
    assert "uploaded 0 files" in out and f"nothing changed since job {job['job_id']}" in out


def test_given_finished_job_when_listed_shown_and_downloaded_then_the_api_view(
    trained: dict[str, object], state: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    job = json.loads((trained["out"] / "job.json").read_text())  # type: ignore[operator]

    dataset = str(trained["dataset"])
    code, listed, _ = run(capsys, "jobs", "--dataset", dataset, "--json", "--local", str(state))
    assert code == 0 and [item["job_id"] for item in printed_json(listed)] == [job["job_id"]]
    code, every, _ = run(capsys, "jobs", "--json", "--local", str(state))
    assert code == 0 and job["job_id"] in [item["job_id"] for item in printed_json(every)]
    code, shown, _ = run(capsys, "show", job["job_id"], "--json", "--local", str(state))
    assert code == 0 and printed_json(shown)["status"] == "COMPLETED"
    code, _, _ = run(capsys, "download", job["job_id"], str(tmp_path / "again"), "--local", str(state))
    assert code == 0 and (tmp_path / "again" / "pytorch_lora_weights.safetensors").is_file()


def test_given_completed_job_when_generate_then_lora_pictures_downloaded_and_listed_on_the_job(
    trained: dict[str, object], state: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    job_id = json.loads((trained["out"] / "job.json").read_text())["job_id"]  # type: ignore[operator]
    out = tmp_path / "generated"

    code, printed, err = run(
        capsys, "generate", job_id, "a dwjz", "a dwjz, blue", "--steps", "2", "--scale", "0.8",
        "--out", str(out), "--local", str(state),
    )  # fmt: skip

    assert code == 0, err
    files = sorted(out.glob("*.png"))
    assert [path.name for path in files] == ["00.png", "01.png"]
    assert all(Image.open(path).size == (64, 64) for path in files)  # the job's preview resolution
    assert all(f"{path}\n" in printed for path in files)
    [generation_id] = re.findall(r"^generation (\w+): COMPLETED$", printed, flags=re.MULTILINE)
    code, shown, _ = run(capsys, "show", job_id, "--json", "--local", str(state))
    assert printed_json(shown)["generations"][0] == {
        "generation_id": generation_id,
        "status": "COMPLETED",
        "created_at": printed_json(shown)["generations"][0]["created_at"],
    }


def test_given_rejectable_folder_when_trained_then_report_printed_and_nothing_uploaded(
    state: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = write_sample_dataset(tmp_path, max_train_steps=30, preview_steps=4)
    (folder / "10_dwjz" / "img01.png").write_bytes(b"not an image")

    code, out, _ = run(capsys, "train", str(folder), "--dataset", "cli-bad", "--local", str(state))

    assert code == 1
    assert "UNSUPPORTED_FORMAT" in out and "10_dwjz/img01.png" in out and "rejected" in out
    code, listed, _ = run(capsys, "jobs", "--dataset", "cli-bad", "--local", str(state))
    assert code == 0 and "no jobs for dataset cli-bad" in listed


def test_given_running_job_when_cancelled_then_cancelled_and_a_retry_starts_attempt_2(
    state: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = write_sample_dataset(tmp_path, max_train_steps=5000, preview_steps=4)
    code, out, _ = run(capsys, "train", str(folder), "--dataset", "cli-long", "--local", str(state))
    assert code == 0, out
    [job_id] = re.findall(r"^job (\w+): \w+; follow it with", out, flags=re.MULTILINE)

    assert run(capsys, "cancel", job_id, "--local", str(state))[0] == 0
    code, shown, _ = run(capsys, "show", job_id, "--json", "--local", str(state))
    assert printed_json(shown)["status"] == "CANCELLED"
    code, _, err = run(capsys, "generate", job_id, "a dwjz", "--steps", "2", "--local", str(state))
    assert code == 1 and len(err.strip().splitlines()) == 1  # only a COMPLETED job generates
    assert "only COMPLETED jobs can be used to generate (JOB_STATE_CONFLICT, HTTP 409)" in err
    code, retried, _ = run(capsys, "retry", job_id, "--local", str(state))
    assert code == 0 and "attempt 2" in retried
    run(capsys, "cancel", job_id, "--local", str(state))  # stop the retry: nothing to wait for


def test_given_targets_when_doctor_runs_then_says_which_and_whether_it_answers(
    state: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "doctor", "--local", str(state))
    assert code == 0 and f"target: local:{state}" in out and "API key is accepted" in out

    code, _, err = run(capsys, "doctor", "--local", str(tmp_path))
    assert code == 1 and "no local cloud runs in" in err and "Traceback" not in err


def test_given_unknown_job_when_shown_then_one_line_and_exit_1(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "show", "0" * 24, "--local", str(state))

    assert code == 1 and len(err.strip().splitlines()) == 1 and "JOB_NOT_FOUND" in err
