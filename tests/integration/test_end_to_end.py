"""The whole product on the embedded local cloud: real template, real ASL, real handlers, real containers.

One local cloud serves three datasets uploaded together (a good one, a broken one, one naming a model that
cannot be loaded); each test then checks one outcome through the user's interfaces only (S3, SNS→SQS, API).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from loraflow_local.client import TERMINAL_STATUSES, StackClient
from loraflow_local.sample_dataset import (
    CONFIG_NAME,
    FOLDERS,
    PREVIEW_PROMPTS,
    SAMPLE_DATASET_ID,
    write_sample_dataset,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

BAD_DATASET_ID = "0002-broken"
NO_MODEL_DATASET_ID = "0003-unloadable-model"
QUICK = {"max_train_steps": 30, "preview_steps": 4}  # a job that runs, not one that learns
[JPEG_FOLDER] = [folder.folder for folder in FOLDERS if folder.extension == "jpg"]


def _write_broken_dataset(root: Path) -> Path:
    dataset = write_sample_dataset(root / "broken-src", **QUICK)
    (dataset / "10_dwjz").rename(dataset / "ten_dwjz")  # BAD_FOLDER_NAME
    truncated = dataset / JPEG_FOLDER / "img01.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-200])  # UNREADABLE_IMAGE (no EOI)
    (dataset / JPEG_FOLDER / "notes.gif").write_bytes(b"GIF89a" + b"\0" * 64)  # not an image we take
    return dataset


def _write_unloadable_model_dataset(root: Path) -> Path:
    dataset = write_sample_dataset(root / "nomodel-src", **QUICK)
    config = dataset / CONFIG_NAME
    config.write_text(
        'pretrained_model_name_or_path = "no-such-org/no-such-model"\n' + config.read_text(), encoding="utf-8"
    )
    return dataset


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Upload three datasets at once and collect each one's terminal notification and API view."""
    from loraflow_local.cloud import LocalCloud

    root = tmp_path_factory.mktemp("e2e")
    with LocalCloud(root / "state") as cloud:
        client = StackClient(cloud.endpoints)
        queue_url = client.subscribe_notifications("e2e-notifications")
        uploads = {
            SAMPLE_DATASET_ID: write_sample_dataset(root / "good-src", **QUICK),
            BAD_DATASET_ID: _write_broken_dataset(root),
            NO_MODEL_DATASET_ID: _write_unloadable_model_dataset(root),
        }
        for dataset_id, folder in uploads.items():
            client.upload_dataset(folder, dataset_id)
        notifications: dict[str, list[dict[str, Any]]] = {}
        while sum(n[-1]["status"] in TERMINAL_STATUSES for n in notifications.values()) < len(uploads):
            notification = client.next_notification(queue_url, timeout_s=400)
            assert notification is not None, f"timed out; terminal so far: {notifications}"
            notifications.setdefault(notification["dataset"], []).append(notification)
        # A re-upload of identical content (as a retried sync would) must not start a second job.
        client.upload_dataset(uploads[SAMPLE_DATASET_ID], SAMPLE_DATASET_ID, seed=1)
        late = client.next_notification(queue_url, timeout_s=12)
        jobs = {d: client.api_get(f"/jobs/{n[-1]['job_id']}")[1] for d, n in notifications.items()}
        listing = client.api_get(f"/jobs?dataset={SAMPLE_DATASET_ID}")
        yield {
            "client": client,
            "notifications": notifications,
            "late_notification": late,
            "jobs": jobs,
            "listing": listing,
            "forbidden": client.api_get(f"/jobs/{jobs[SAMPLE_DATASET_ID]['job_id']}", api_key="wrong-key"),
            "missing": client.api_get("/jobs/does-not-exist"),
            "tmp": root,
        }


def test_given_good_dataset_when_uploaded_then_job_completes_with_lora_and_previews(outcomes):
    job = outcomes["jobs"][SAMPLE_DATASET_ID]
    assert job["status"] == "COMPLETED", job
    assert job["training"]["steps"] == 30
    assert job["training"]["final_loss"] > 0
    ignored = [w["message"] for w in job["warnings"] if w["code"] == "IGNORED_CONFIG_KEY"]
    assert any("xformers" in message for message in ignored), job["warnings"]
    lora = outcomes["client"].download(
        job["artifacts"]["lora_diffusers_url"], outcomes["tmp"] / "lora.safetensors"
    )
    weights = load_file(str(lora))
    components = {key.split(".")[0] for key in weights}
    assert "unet" in components and components <= {"unet", "text_encoder"}, sorted(components)
    kohya = outcomes["client"].download(
        job["artifacts"]["lora_kohya_url"], outcomes["tmp"] / "demo-lora.safetensors"
    )
    with safe_open(str(kohya), framework="pt") as handle:
        assert handle.metadata()["ss_output_name"] == "demo-lora"
        kohya_keys = handle.keys()  # a safe_open handle is not a dict: keys() is its API
        assert any(key.startswith("lora_unet_") and key.endswith(".alpha") for key in kohya_keys)
    assert [preview["prompt"] for preview in job["previews"]] == list(PREVIEW_PROMPTS)
    for preview in job["previews"]:
        for url in (preview["url"], preview["base_url"]):
            png = outcomes["client"].download(url, outcomes["tmp"] / "preview.png")
            image = Image.open(io.BytesIO(png.read_bytes()))
            assert (image.format, image.size) == ("PNG", (64, 64))
    sheet = outcomes["client"].download(job["contact_sheet_url"], outcomes["tmp"] / "sheet.png")
    assert Image.open(sheet).size[1] > 256 * len(PREVIEW_PROMPTS)  # a row per prompt


def test_given_good_dataset_when_it_completes_then_one_notification_per_job_in_order(outcomes):
    statuses = [n["status"] for n in outcomes["notifications"][SAMPLE_DATASET_ID]]
    assert statuses == ["COMPLETED"]


def test_given_identical_reupload_when_settled_then_no_second_job(outcomes):
    assert outcomes["late_notification"] is None
    status, listing = outcomes["listing"]
    assert status == 200
    assert [item["job_id"] for item in listing["items"]] == [outcomes["jobs"][SAMPLE_DATASET_ID]["job_id"]]


def test_given_broken_dataset_when_uploaded_then_rejected_with_every_problem(outcomes):
    notification = outcomes["notifications"][BAD_DATASET_ID][-1]
    assert notification["status"] == "REJECTED"
    job = outcomes["jobs"][BAD_DATASET_ID]
    problems = {(p["code"], p["path"]) for p in job["errors"]}
    assert ("BAD_FOLDER_NAME", "ten_dwjz") in problems
    assert ("UNREADABLE_IMAGE", f"{JPEG_FOLDER}/img01.jpg") in problems
    assert ("UNSUPPORTED_FORMAT", f"{JPEG_FOLDER}/notes.gif") in problems  # never silently dropped
    assert job.get("training") in (None, {})


def test_given_unloadable_model_when_training_then_failed_with_reason(outcomes):
    job = outcomes["jobs"][NO_MODEL_DATASET_ID]
    assert job["status"] == "FAILED", job
    codes = [p["code"] for p in job["errors"]]
    assert codes == ["MODEL_LOAD_FAILED"], job["errors"]
    assert "no-such-org/no-such-model" in job["errors"][0]["message"]


def test_given_wrong_api_key_when_calling_api_then_forbidden(outcomes):
    status, body = outcomes["forbidden"]
    assert (status, body) == (403, {"message": "Forbidden"})


def test_given_unknown_job_when_fetched_then_404_json(outcomes):
    status, body = outcomes["missing"]
    assert status == 404
    assert body["code"] == "JOB_NOT_FOUND"
