"""The new model families on the embedded local cloud, through the user's interfaces only: a FLUX.1 dataset
naming a Hub model (the tiny FLUX.1, served on loopback) and a Z-Image dataset naming the tiny model the
local cloud provisions in S3 train, render previews on their compute class's endpoint and deliver both
LoRA files. Then a second FLUX.1 dataset on the same Hub model trains from the stack's copy: no byte from
the Hub."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loraflow_diffusion.tiny_models import TINY_MODELS
from loraflow_local.base_model import tiny_model_uri
from loraflow_local.client import TERMINAL_STATUSES, StackClient
from loraflow_local.loopback_hub import LoopbackHub
from loraflow_local.sample_dataset import CONFIG_NAME, write_sample_dataset
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

HUB_MODEL = "loopback/tiny-flux1"
# dataset -> (base model: a Hub id or a tiny model in S3, the family ingest tells from its model_index.json
# (the Hub's, or the S3 folder's), its compute class)
DATASETS = {
    "0101-flux": (HUB_MODEL, "flux1", "large"),
    "0102-zimage": ("tiny-z_image", "z_image", "standard"),
}
AGAIN = "0103-flux-again"  # uploaded once the others ended: the Hub model is in the stack by then
AGAIN_STEPS = 2  # it only has to load, train and render from the stack's copy
# What each family's kohya file is named in (the names ComfyUI maps), and what its metadata says.
KOHYA_FACTS = {
    "flux1": ("lora_unet_double_blocks_", "flux1", "flux-1-dev/lora"),
    "z_image": ("lora_unet_layers_", "z_image", "Z-Image/lora"),
}


def _dataset_for(root: Path, dataset_id: str, model_uri: str, steps: int = 30) -> Path:
    dataset = write_sample_dataset(root / dataset_id, max_train_steps=steps, preview_steps=4)
    config = dataset / CONFIG_NAME
    lines = [f'pretrained_model_name_or_path = "{model_uri}"', "t5xxl_max_token_length = 32"]
    config.write_text("\n".join(lines) + "\n" + config.read_text(), encoding="utf-8")
    return dataset


def _wait(client: StackClient, queue_url: str, datasets: set[str]) -> dict[str, dict[str, Any]]:
    terminal: dict[str, dict[str, Any]] = {}
    while set(terminal) != datasets:
        notification = client.next_notification(queue_url, timeout_s=600)
        assert notification is not None, f"timed out; terminal so far: {terminal}"
        if notification["status"] in TERMINAL_STATUSES:
            terminal[notification["dataset"]] = notification
    return {d: client.api_get(f"/jobs/{n['job_id']}")[1] for d, n in terminal.items()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackHub]:
    _, build = TINY_MODELS["tiny-flux1"]
    with LoopbackHub({HUB_MODEL: build(tmp_path_factory.mktemp("hub") / "tiny-flux1")}) as served:
        yield served


@pytest.fixture(scope="module")
def hub_env(hub: LoopbackHub) -> Iterator[None]:
    """Set before the cloud starts: its ingest function and its training jobs reach this Hub."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", hub.endpoint)
        env.delenv("HF_HUB_OFFLINE", raising=False)
        yield


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory, hub: LoopbackHub, hub_env: None
) -> Iterator[dict[str, Any]]:
    from loraflow_local.cloud import LocalCloud

    root = tmp_path_factory.mktemp("families")
    with LocalCloud(root / "state") as cloud:
        client = StackClient(cloud.endpoints)
        queue_url = client.subscribe_notifications("families-notifications")
        bucket = cloud.endpoints["artifacts_bucket"]
        for dataset_id, (model, _, _) in DATASETS.items():
            uri = model if model == HUB_MODEL else tiny_model_uri(bucket, model)
            client.upload_dataset(_dataset_for(root, dataset_id, uri), dataset_id)
        jobs = _wait(client, queue_url, set(DATASETS))
        first_use = hub.bytes_served
        hub.reset_counters()
        client.upload_dataset(_dataset_for(root, AGAIN, HUB_MODEL, steps=AGAIN_STEPS), AGAIN)
        again = _wait(client, queue_url, {AGAIN})[AGAIN]
        yield {"client": client, "jobs": jobs, "tmp": root, "again": again, "first_use_bytes": first_use}


def test_given_hub_model_used_before_when_a_second_dataset_trains_on_it_then_no_byte_from_the_hub(
    outcomes: dict[str, Any], hub: LoopbackHub
) -> None:
    first, again = outcomes["jobs"]["0101-flux"], outcomes["again"]
    commit = hub.commit(HUB_MODEL)

    assert outcomes["first_use_bytes"] > 0
    assert again["status"] == "COMPLETED", again
    assert (hub.bytes_served, hub.file_requests) == (0, 0)  # ingest, trainer and previews: the stack's copy
    for job in (first, again):
        source = job["base_model_source"]
        assert (source["repo"], source["commit"]) == (HUB_MODEL, commit)
        assert source["mirror_s3_uri"].endswith(f"/base-models/hub/{HUB_MODEL}@{commit}/")
    assert again["training"]["steps"] == AGAIN_STEPS and len(again["previews"]) >= 1


@pytest.mark.parametrize("dataset_id", list(DATASETS))
def test_given_dataset_on_a_new_family_when_uploaded_then_it_trains_on_its_compute_and_delivers(
    outcomes: dict[str, Any], dataset_id: str
) -> None:
    _, family, compute = DATASETS[dataset_id]
    job = outcomes["jobs"][dataset_id]
    client, tmp = outcomes["client"], outcomes["tmp"] / dataset_id

    assert job["status"] == "COMPLETED", job
    assert (job["model_family"], job["compute"]) == (family, compute)
    assert job["training"]["steps"] == 30
    # The trainer names what does not apply to the family (the T5 limit is FLUX.1's alone).
    adjusted = " ".join(w["message"] for w in job["warnings"])
    assert ("t5xxl_max_token_length" in adjusted) == (family != "flux1"), job["warnings"]
    weights = load_file(
        str(client.download(job["artifacts"]["lora_diffusers_url"], tmp / "lora.safetensors"))
    )
    components = {key.split(".")[0] for key in weights}
    # FLUX.1 trains CLIP-L too (T5 never); Z-Image's LLM text encoder is never trained.
    assert components == ({"transformer", "text_encoder"} if family == "flux1" else {"transformer"})
    prefix, base_version, architecture = KOHYA_FACTS[family]
    kohya = client.download(job["artifacts"]["lora_kohya_url"], tmp / "kohya.safetensors")
    with safe_open(str(kohya), framework="pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert any(key.startswith(prefix) for key in keys), keys[:5]
    assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == (
        base_version,
        architecture,
    )
    assert len(job["previews"]) >= 2
    for preview in job["previews"]:
        png = client.download(preview["url"], tmp / "preview.png")
        assert Image.open(io.BytesIO(png.read_bytes())).size == (64, 64)
