"""Ingest pins a Hub base model to its exact commit before any GPU time: a missing model or revision and a
gated model the stack cannot read are rejected naming the config key; the Hub's model_index.json tells the
family (and so the compute); an unreachable Hub leaves the job unpinned with a warning. Served on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from functions_aws import Cloud, FakeLambdaContext, upload_dataset, valid_dataset_files
from loraflow_local.loopback_hub import LoopbackHub
from loraflow_shared.errors import ErrorCode
from loraflow_shared.jobs.model import JobStatus
from test_ingest_handler import DATASET, Ingest, executions, jobs, make_ingest, sqs_event

FLUX_FINETUNE = "someone/flux-finetune"
GATED = "gated-org/gated-model"
NOT_DIFFUSERS = "someone/single-file-only"
TOKEN = "hf_loopbacktoken"


def _repo(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def ingest(cloud: Cloud, context: FakeLambdaContext) -> Ingest:
    return make_ingest(cloud, context)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    repos = {
        FLUX_FINETUNE: _repo(tmp_path / "flux", {"model_index.json": '{"_class_name": "FluxPipeline"}'}),
        GATED: _repo(tmp_path / "gated", {"model_index.json": '{"_class_name": "StableDiffusionPipeline"}'}),
        NOT_DIFFUSERS: _repo(tmp_path / "single", {"model.safetensors": "weights"}),
    }
    with LoopbackHub(repos, token=TOKEN, gated=[GATED]) as served:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_ENDPOINT", served.endpoint)
        yield served


def _ingest_config(cloud: Cloud, ingest: Ingest, model: str) -> None:
    config = f'pretrained_model_name_or_path = "{model}"\nresolution = 64\n'.encode()
    upload_dataset(DATASET, valid_dataset_files() | {"config.toml": config})
    ingest(sqs_event(f"{DATASET}/config.toml"))


@pytest.mark.parametrize("revision", ["", "@main"])
def test_given_hub_model_when_ingested_then_pinned_to_its_commit_and_family_read_from_its_model_index(
    cloud: Cloud, ingest: Ingest, hub: LoopbackHub, revision: str
) -> None:
    _ingest_config(cloud, ingest, FLUX_FINETUNE + revision)

    [job] = jobs(cloud)
    assert job.status is JobStatus.QUEUED, job.errors
    source = job.base_model_source
    assert source is not None
    assert (source.repo, source.commit, source.mirror_s3_uri) == (
        FLUX_FINETUNE,
        hub.commit(FLUX_FINETUNE),
        None,
    )
    assert source.revision == (revision[1:] or None)
    # Not a published FLUX.1 id: its model_index.json on the Hub says FluxPipeline.
    assert (job.model_family, job.compute) == ("flux1", "large")
    assert job.warnings == []


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("nobody/no-such-model", "there is no Hub model 'nobody/no-such-model'"),
        (f"{FLUX_FINETUNE}@v9", f"{FLUX_FINETUNE} has no revision 'v9'"),
        (GATED, f"{GATED} is gated or private; deploy with HuggingFaceTokenSecretArn"),
    ],
)
def test_given_hub_model_the_stack_cannot_train_on_when_ingested_then_rejected_naming_the_key(
    cloud: Cloud, ingest: Ingest, hub: LoopbackHub, model: str, expected: str
) -> None:
    _ingest_config(cloud, ingest, model)

    [job] = jobs(cloud)
    assert job.status is JobStatus.REJECTED
    [error] = job.errors
    assert (error.code, error.path) == (ErrorCode.INVALID_CONFIG, "pretrained_model_name_or_path")
    assert expected in error.message
    assert executions(cloud) == []


def test_given_gated_model_and_the_stacks_token_when_ingested_then_pinned(
    cloud: Cloud, context: FakeLambdaContext, hub: LoopbackHub
) -> None:
    secret_arn = _store_secret(TOKEN)
    ingest = make_ingest(cloud, context, HF_TOKEN_SECRET_ARN=secret_arn)

    _ingest_config(cloud, ingest, GATED)

    [job] = jobs(cloud)
    assert job.status is JobStatus.QUEUED, job.errors
    assert job.base_model_source is not None and job.base_model_source.commit == hub.commit(GATED)
    assert TOKEN not in job.model_dump_json()


def test_given_hub_repo_without_model_index_when_ingested_then_pinned_with_unknown_family_warning(
    cloud: Cloud, ingest: Ingest, hub: LoopbackHub
) -> None:
    _ingest_config(cloud, ingest, NOT_DIFFUSERS)

    [job] = jobs(cloud)
    assert job.status is JobStatus.QUEUED
    assert job.base_model_source is not None and job.base_model_source.commit == hub.commit(NOT_DIFFUSERS)
    assert [(w.code, w.path) for w in job.warnings] == [(ErrorCode.SETTING_ADJUSTED, "model_family")]


def test_given_hub_unreachable_when_ingested_then_queued_unpinned_with_a_warning(
    cloud: Cloud, ingest: Ingest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens

    _ingest_config(cloud, ingest, FLUX_FINETUNE)

    [job] = jobs(cloud)
    assert (job.status, job.base_model_source) == (JobStatus.QUEUED, None)
    pinning = [w for w in job.warnings if w.path == "pretrained_model_name_or_path"]
    assert [w.code for w in pinning] == [ErrorCode.SETTING_ADJUSTED]
    assert "the Hub could not be reached" in pinning[0].message
    assert "could not be pinned" in pinning[0].message


def _store_secret(token: str) -> str:
    client = boto3.client("secretsmanager", region_name="us-east-1")
    return str(client.create_secret(Name="hf-token", SecretString=token)["ARN"])
