"""The gallery page in a real browser (headless Chromium driven by Playwright) against the local cloud:
the key prompt, the job list, a job's previews, a rejected dataset's table, cancel from the button and the
generate form. Each test saves a screenshot under `test-output/gallery/` (look at them)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loraflow_local.cli import main
from loraflow_local.jobs_api import JobsApi
from loraflow_local.sample_dataset import write_sample_dataset
from loraflow_local.targets import Endpoints, Target, resolve
from loraflow_local.uploader import upload_dataset

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("LORAFLOW_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[3] / "test-output" / "gallery"
# Chromium's own background traffic (updates, sync, QUIC probes) fails on a closed network: keep it off.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
WAIT_MS = 60_000
JOB_ENDS_S = 120.0

if not Path(CHROMIUM).is_file():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def endpoints(state: Path) -> Endpoints:
    return resolve(Target("local", str(state)))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, endpoints: Endpoints, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context on the gallery with the API key entered; a screenshot when the test ends."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    opened.goto(endpoints.api_url + "/")
    opened.fill("#api-key", endpoints.api_key)
    opened.click("#key-form button[type=submit]")
    yield opened
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    opened.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def _finished(api: JobsApi, dataset: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_ENDS_S
    while time.monotonic() < deadline:
        jobs = api.jobs(dataset)
        if jobs and jobs[0]["status"] in ("REJECTED", "COMPLETED", "FAILED", "CANCELLED"):
            return jobs[0]
        time.sleep(1)
    raise AssertionError(f"no job of {dataset} ended within {JOB_ENDS_S:.0f} s")


def _job_id(trained: dict[str, object]) -> str:
    job: dict[str, Any] = json.loads((Path(str(trained["out"])) / "job.json").read_text())
    return str(job["job_id"])


def test_given_no_key_when_the_gallery_opens_then_it_asks_for_one_and_a_wrong_one_is_refused(
    browser: Any, endpoints: Endpoints
) -> None:
    context = browser.new_context()
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)

    opened.goto(endpoints.api_url + "/")
    opened.fill("#api-key", "not-the-key")
    opened.click("#key-form button[type=submit]")

    opened.wait_for_selector("text=That API key was refused")
    context.close()


def test_given_a_finished_job_when_the_list_opens_then_it_shows_the_job_completed(
    page: Any, trained: dict[str, object]
) -> None:
    row = page.wait_for_selector(f"#jobs tr[data-job='{_job_id(trained)}']")

    assert row.query_selector("[data-status]").get_attribute("data-status") == "COMPLETED"
    assert str(trained["dataset"]) in row.inner_text()


def test_given_a_finished_job_when_its_page_opens_then_previews_load_and_the_loss_curve_is_drawn(
    page: Any, trained: dict[str, object]
) -> None:
    page.goto(page.url.split("#")[0] + f"#/jobs/{_job_id(trained)}")
    page.wait_for_selector("#previews img")
    page.wait_for_function("() => [...document.querySelectorAll('#previews img')].every((i) => i.complete)")

    sizes = page.eval_on_selector_all("#previews img", "images => images.map((i) => i.naturalWidth)")
    assert len(sizes) == 2 * len(page.query_selector_all("#previews figure")) > 0
    assert all(width > 0 for width in sizes)
    assert page.query_selector("#loss-curve polyline") is not None
    timeline = page.query_selector_all("#timeline [data-status]")
    assert [item.get_attribute("data-status") for item in timeline][-1] == "COMPLETED"
    assert page.query_selector("a:has-text('LoRA (diffusers)')") is not None


def test_given_a_rejected_dataset_when_its_page_opens_then_the_table_names_the_bad_file(
    page: Any, endpoints: Endpoints, tmp_path: Path
) -> None:
    folder = write_sample_dataset(tmp_path / "bad", max_train_steps=30, preview_steps=4)
    (folder / "10_dwjz" / "img01.png").write_bytes(b"not an image")
    upload_dataset(endpoints.client("s3"), folder, endpoints.dataset_bucket, "gallery-bad")  # past the CLI
    job = _finished(JobsApi(endpoints.api_url, endpoints.api_key), "gallery-bad")
    assert job["status"] == "REJECTED"

    page.goto(page.url.split("#")[0] + f"#/jobs/{job['job_id']}")
    table = page.wait_for_selector("#errors")

    assert "10_dwjz/img01.png" in table.inner_text()


def test_given_a_running_job_when_cancel_is_clicked_then_it_ends_cancelled(
    page: Any, state: Path, endpoints: Endpoints, tmp_path: Path
) -> None:
    folder = write_sample_dataset(tmp_path, max_train_steps=5000, preview_steps=4)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(folder), "--dataset", "gallery-long", "--local", str(state)]) == 0
    [job] = JobsApi(endpoints.api_url, endpoints.api_key).jobs("gallery-long")

    page.goto(page.url.split("#")[0] + f"#/jobs/{job['job_id']}")
    page.click("#cancel")

    page.wait_for_selector("h1 + [data-status='CANCELLED']")


def test_given_a_finished_job_when_the_generate_form_is_sent_then_its_pictures_appear(
    page: Any, trained: dict[str, object], endpoints: Endpoints
) -> None:
    job_id = _job_id(trained)
    earlier = [
        g["generation_id"] for g in JobsApi(endpoints.api_url, endpoints.api_key).job(job_id)["generations"]
    ]
    fetched: list[str] = []  # each finished generation's own GET, which the page should make once
    page.on("request", lambda r: fetched.append(r.url) if "/generations/" in r.url else None)
    page.goto(page.url.split("#")[0] + f"#/jobs/{job_id}")
    page.fill("#generate-prompts", "a dwjz\na big blue square at the left on white")
    page.fill("#generate-steps", "2")
    page.click("#generate")

    excluded = ", ".join(f"[data-generation={g!r}]" for g in earlier)
    new_card = f".generation:not({excluded})" if earlier else ".generation"
    page.wait_for_selector(f"{new_card} [data-status='COMPLETED']")
    page.wait_for_function(f'() => [...document.querySelectorAll("{new_card} img")].every((i) => i.complete)')
    images = page.eval_on_selector_all(f"{new_card} img", "all => all.map((i) => [i.alt, i.naturalWidth])")
    assert [alt for alt, _ in images] == ["a dwjz", "a big blue square at the left on white"]
    assert all(width > 0 for _, width in images)
    page.evaluate("async () => { await route(); await route(); }")  # two more refreshes, as polling does
    assert fetched and len(fetched) == len(set(fetched)), "a finished generation was fetched again"
