from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import torch
from diffusion_kit import TrainingRun
from flask.testing import FlaskClient
from loraflow_diffusion.families import SupportedPipeline
from loraflow_diffusion.models import load_pipeline
from loraflow_inference.handler import PreviewRenderer
from loraflow_inference.server import create_app
from loraflow_inference.settings import InferenceSettings
from pydantic import ValidationError

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

BUCKET = "artifacts"
LORA_KEY = "jobs/job-9/lora/pytorch_lora_weights.safetensors"


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    def loader(ref: str) -> SupportedPipeline:
        return load_pipeline(ref, device=torch.device("cpu"), dtype=torch.float32, cache_dir=tmp_path)

    return create_app(PreviewRenderer(loader)).test_client()


def _body(base_model: str, **changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "job_id": "job-9",
        "base_model": base_model,
        "lora_s3_uri": f"s3://{BUCKET}/{LORA_KEY}",
        "prompts": ["ohwx, a red circle", "sks dog"],
        "steps": 2,
        "resolution": 64,
        "seed": 0,
        "output_s3_prefix": f"s3://{BUCKET}/jobs/job-9/previews/",
    }
    return {**body, **changes}


def test_given_server_when_pinged_then_200_ok(client: FlaskClient) -> None:
    response = client.get("/ping")

    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})


def test_given_valid_request_when_invoked_then_200_with_preview_uris(
    client: FlaskClient, aws: None, training_run: TrainingRun, tiny_model: Path
) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(training_run.dirs.model / "pytorch_lora_weights.safetensors"), BUCKET, LORA_KEY)

    response = client.post("/invocations", data=json.dumps(_body(str(tiny_model))))

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    prefix = f"s3://{BUCKET}/jobs/job-9/previews/"
    assert [(p["s3_uri"], p["base_s3_uri"]) for p in body["previews"]] == [
        (f"{prefix}0.png", f"{prefix}base-0.png"),
        (f"{prefix}1.png", f"{prefix}base-1.png"),
    ]
    assert body["contact_sheet_s3_uri"] == f"{prefix}contact-sheet.png"
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="jobs/job-9/previews/")["Contents"]
    assert sorted(item["Key"] for item in listed) == [
        "jobs/job-9/previews/0.png",
        "jobs/job-9/previews/1.png",
        "jobs/job-9/previews/base-0.png",
        "jobs/job-9/previews/base-1.png",
        "jobs/job-9/previews/contact-sheet.png",
    ]


@pytest.mark.parametrize(
    ("data", "mentioned"),
    [
        (b"not json", "json"),
        (json.dumps(_body("m", steps=0)).encode(), "steps"),
        (json.dumps(_body("m", resolution=65)).encode(), "resolution"),
        (json.dumps({**_body("m"), "extra": 1}).encode(), "extra"),
        (json.dumps({k: v for k, v in _body("m").items() if k != "prompts"}).encode(), "prompts"),
    ],
)
def test_given_bad_body_when_invoked_then_400_bad_request(
    client: FlaskClient, data: bytes, mentioned: str
) -> None:
    response = client.post("/invocations", data=data)

    assert response.status_code == 400
    body = response.get_json()
    assert body["code"] == "BAD_REQUEST"
    assert mentioned in body["message"].lower()


def test_given_unloadable_model_when_invoked_then_500_with_domain_code(
    client: FlaskClient, aws: None, tmp_path: Path
) -> None:
    response = client.post("/invocations", data=json.dumps(_body(str(tmp_path / "missing-model"))))

    assert response.status_code == 500
    body = response.get_json()
    assert body["code"] == "MODEL_LOAD_FAILED"
    assert "missing-model" in body["message"] and "Traceback" not in body["message"]


def test_given_unknown_route_when_called_then_404(client: FlaskClient) -> None:
    assert client.get("/nope").status_code == 404


def test_given_environment_when_settings_read_then_validated() -> None:
    settings = InferenceSettings.from_env(
        {"LORAFLOW_MAX_CACHED_PIPELINES": "2", "LORAFLOW_PRECISION": "bf16"}
    )

    assert (settings.max_cached_pipelines, settings.precision) == (2, "bf16")
    with pytest.raises(ValidationError):
        InferenceSettings.from_env({"LORAFLOW_MAX_CACHED_PIPELINES": "5"})
