from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from functions_aws import (
    DATASET_BUCKET,
    DEFAULT_BASE_MODEL,
    REGION,
    Cloud,
    FakeLambdaContext,
    load_event,
    png,
    upload_dataset,
    upload_model_index,
    valid_dataset_files,
)
from loraflow_ingest import app
from loraflow_ingest.adapters import build_ingestor
from loraflow_ingest.settings import IngestSettings
from loraflow_shared.errors import ErrorCode
from loraflow_shared.jobs.model import Job, JobStatus, dataset_fingerprint, job_id_for
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.s3 import list_objects

DATASET = "0001-dataset"
Ingest = Callable[[dict[str, Any]], dict[str, Any]]


def sqs_event(*keys: str, bucket: str = DATASET_BUCKET) -> dict[str, Any]:
    """The fixture SQS event, one record per key, keys `quote_plus`-encoded as S3 sends them."""
    template = load_event("s3_put_in_sqs.json")["Records"][0]
    records = []
    for index, key in enumerate(keys):
        record = copy.deepcopy(template)
        body = json.loads(record["body"])
        body["Records"][0]["s3"]["object"]["key"] = quote_plus(key, safe="/")
        body["Records"][0]["s3"]["bucket"]["name"] = bucket
        record["body"] = json.dumps(body)
        record["messageId"] = f"message-{index}"
        records.append(record)
    return {"Records": records}


def make_ingest(cloud: Cloud, context: FakeLambdaContext, **overrides: str) -> Ingest:
    settings = IngestSettings.from_environ({**cloud.env(), **overrides})
    ingestor = build_ingestor(settings)
    return lambda event: app.lambda_handler(event, context, ingestor=ingestor)


@pytest.fixture
def ingest(cloud: Cloud, context: FakeLambdaContext) -> Ingest:
    return make_ingest(cloud, context)


def jobs(cloud: Cloud, dataset: str = DATASET) -> list[Job]:
    return JobRepository(cloud.table).list_by_dataset(dataset, limit=100)[0]


def executions(cloud: Cloud) -> list[dict[str, Any]]:
    sfn = boto3.client("stepfunctions", region_name=REGION)
    listed = sfn.list_executions(stateMachineArn=cloud.state_machine_arn)["executions"]
    return [dict(sfn.describe_execution(executionArn=e["executionArn"])) for e in listed]


def test_given_settled_valid_dataset_when_ingested_then_queued_and_execution_started(
    cloud: Cloud, ingest: Ingest
) -> None:
    upload_dataset(DATASET, valid_dataset_files())

    response = ingest(sqs_event(f"{DATASET}/20_zqxj dog/img 1.png"))

    assert response == {"batchItemFailures": []}
    [job] = jobs(cloud)
    assert job.status is JobStatus.QUEUED
    assert job.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert job.config_file == "config.toml"
    # No Hub in unit tests (HF_HUB_OFFLINE): the model is not pinned, and the job says so (test_ingest_hub).
    assert [(w.code, w.path) for w in job.warnings] == [
        (ErrorCode.IGNORED_CONFIG_KEY, "config.toml"),
        (ErrorCode.SETTING_ADJUSTED, "pretrained_model_name_or_path"),
    ]
    assert job.base_model_source is None
    assert job.preview is not None
    assert (job.preview.steps, job.preview.resolution) == (3, 64)
    assert any("zqxj dog" in prompt for prompt in job.preview.prompts)
    [execution] = executions(cloud)
    assert execution["name"] == f"{job.job_id}-1" and job.job_id == job_id_for(DATASET, job.fingerprint)
    assert execution["executionArn"] == job.execution_arn == job.attempts[0].execution_arn
    assert (job.attempt, job.validation_warnings) == (1, job.warnings)
    assert json.loads(execution["input"]) == {
        "job_id": job.job_id,
        "attempt": 1,
        "dataset": DATASET,
        "dataset_s3_uri": f"s3://{DATASET_BUCKET}/{DATASET}/",
        "config_file": "config.toml",
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    }
    assert cloud.notifications() == []


def test_given_same_events_delivered_twice_when_ingested_then_one_job_and_one_execution(
    cloud: Cloud, ingest: Ingest
) -> None:
    upload_dataset(DATASET, valid_dataset_files())
    keys = [f"{DATASET}/config.toml", f"{DATASET}/20_zqxj dog/img 1.png", f"{DATASET}/20_zqxj dog/img 2.png"]

    ingest(sqs_event(*keys))
    ingest(sqs_event(*keys))

    assert len(jobs(cloud)) == 1
    assert len(executions(cloud)) == 1


def test_given_content_changed_after_a_job_when_ingested_then_second_job(
    cloud: Cloud, ingest: Ingest
) -> None:
    upload_dataset(DATASET, valid_dataset_files())
    ingest(sqs_event(f"{DATASET}/config.toml"))
    upload_dataset(DATASET, {"20_zqxj dog/img 3.png": png(3)})

    ingest(sqs_event(f"{DATASET}/20_zqxj dog/img 3.png"))

    assert len({job.fingerprint for job in jobs(cloud)}) == 2
    assert len(executions(cloud)) == 2


def test_given_uploads_still_arriving_when_ingested_then_message_dropped_without_job(
    cloud: Cloud, context: FakeLambdaContext
) -> None:
    upload_dataset(DATASET, valid_dataset_files())
    ingest = make_ingest(cloud, context, SETTLE_SECONDS="900")

    response = ingest(sqs_event(f"{DATASET}/config.toml"))

    assert response == {"batchItemFailures": []}
    assert jobs(cloud) == []
    assert executions(cloud) == []


def test_given_s3_test_event_when_ingested_then_ignored(cloud: Cloud, ingest: Ingest) -> None:
    response = ingest(load_event("s3_test_event_in_sqs.json"))
    assert response == {"batchItemFailures": []}
    assert cloud.table.scan()["Items"] == []


def test_given_dataset_without_config_when_ingested_then_rejected_and_notified_once(
    cloud: Cloud, ingest: Ingest
) -> None:
    files = valid_dataset_files()
    del files["config.toml"]
    upload_dataset(DATASET, files)

    ingest(sqs_event(f"{DATASET}/20_zqxj dog/img 1.png"))
    ingest(sqs_event(f"{DATASET}/20_zqxj dog/img 2.png"))  # re-delivery: no second notification

    [job] = jobs(cloud)
    assert job.status is JobStatus.REJECTED
    assert [e.code for e in job.errors] == [ErrorCode.INVALID_CONFIG]
    [envelope] = cloud.notifications()
    body = json.loads(envelope["Message"])
    assert (body["job_id"], body["status"]) == (job.job_id, "REJECTED")
    assert body["errors"][0]["code"] == "INVALID_CONFIG"
    assert envelope["MessageAttributes"]["status"]["Value"] == "REJECTED"
    assert executions(cloud) == []


def test_given_dataset_deleted_before_event_when_ingested_then_nothing_happens(
    cloud: Cloud, ingest: Ingest
) -> None:
    response = ingest(sqs_event(f"{DATASET}/20_zqxj dog/img 1.png"))
    assert response == {"batchItemFailures": []}
    assert cloud.table.scan()["Items"] == []


def test_given_malformed_message_among_good_ones_when_ingested_then_only_it_is_retried(
    cloud: Cloud, ingest: Ingest
) -> None:
    upload_dataset(DATASET, valid_dataset_files())
    event = sqs_event(f"{DATASET}/config.toml")
    broken = copy.deepcopy(event["Records"][0]) | {"messageId": "broken", "body": "{not json"}
    event["Records"].append(broken)

    response = ingest(event)

    assert response == {"batchItemFailures": [{"itemIdentifier": "broken"}]}
    assert [job.status for job in jobs(cloud)] == [JobStatus.QUEUED]


def test_given_claim_left_validating_by_a_crash_when_redelivered_then_validation_resumes(
    cloud: Cloud, ingest: Ingest
) -> None:
    upload_dataset(DATASET, valid_dataset_files())
    s3 = boto3.client("s3", region_name=REGION)
    fingerprint = dataset_fingerprint(list_objects(s3, DATASET_BUCKET, f"{DATASET}/"))
    repository = JobRepository(cloud.table)
    now = repository.now()
    repository.claim(
        Job(
            job_id=job_id_for(DATASET, fingerprint),
            dataset=DATASET,
            status=JobStatus.VALIDATING,
            created_at=now,
            updated_at=now,
            fingerprint=fingerprint,
            dataset_s3_uri=f"s3://{DATASET_BUCKET}/{DATASET}/",
        )
    )

    ingest(sqs_event(f"{DATASET}/config.toml"))

    assert [job.status for job in jobs(cloud)] == [JobStatus.QUEUED]
    assert len(executions(cloud)) == 1


def test_given_config_without_base_model_when_ingested_then_default_base_model(
    cloud: Cloud, ingest: Ingest
) -> None:
    files = valid_dataset_files() | {
        "config.toml": b'resolution = 64\n[loraflow]\npreview_prompts = ["zqxj"]\n'
    }
    upload_dataset(DATASET, files)
    upload_model_index(DEFAULT_BASE_MODEL, "StableDiffusionPipeline")

    ingest(sqs_event(f"{DATASET}/config.toml"))

    [job] = jobs(cloud)
    assert job.base_model == DEFAULT_BASE_MODEL
    assert job.preview is not None and job.preview.prompts == ["zqxj"]
    assert job.preview.clip_skip is None
    assert (job.model_family, job.compute) == ("sd15", "standard")
    assert job.warnings == []


def test_given_config_with_clip_skip_when_ingested_then_previews_use_it_too(
    cloud: Cloud, ingest: Ingest
) -> None:
    upload_dataset(DATASET, valid_dataset_files() | {"config.toml": b"resolution = 64\nclip_skip = 2\n"})

    ingest(sqs_event(f"{DATASET}/config.toml"))

    [job] = jobs(cloud)
    assert job.preview is not None and job.preview.clip_skip == 2


def test_given_environment_when_handler_cold_starts_then_settings_come_from_it(
    cloud: Cloud, context: FakeLambdaContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in cloud.env().items():
        monkeypatch.setenv(name, value)
    upload_dataset(DATASET, valid_dataset_files())
    app.default_ingestor.cache_clear()
    try:
        app.lambda_handler(sqs_event(f"{DATASET}/config.toml"), context)
    finally:
        app.default_ingestor.cache_clear()
    assert [job.status for job in jobs(cloud)] == [JobStatus.QUEUED]


@pytest.mark.parametrize(
    ("class_name", "family", "compute"),
    [
        ("FluxPipeline", "flux1", "large"),
        ("QwenImagePipeline", "qwen_image", "large"),
        ("ZImagePipeline", "z_image", "standard"),
    ],
)
def test_given_s3_base_model_folder_when_ingested_then_its_family_and_compute_are_recorded(
    cloud: Cloud, ingest: Ingest, class_name: str, family: str, compute: str
) -> None:
    model = "s3://loraflow-artifacts/base-models/tiny-dit/"
    upload_model_index(model, class_name)
    config = f'pretrained_model_name_or_path = "{model}"\nresolution = 64\n'.encode()
    upload_dataset(DATASET, valid_dataset_files() | {"config.toml": config})

    ingest(sqs_event(f"{DATASET}/config.toml"))

    [job] = jobs(cloud)
    assert job.status is JobStatus.QUEUED
    assert (job.model_family, job.compute) == (family, compute)
    assert job.warnings == []


def test_given_config_claiming_another_family_than_the_folder_when_ingested_then_rejected_naming_both(
    cloud: Cloud, ingest: Ingest
) -> None:
    model = "s3://loraflow-artifacts/base-models/tiny-flux/"
    upload_model_index(model, "FluxPipeline")
    config = f'pretrained_model_name_or_path = "{model}"\nsdxl = true\nresolution = 64\n'.encode()
    upload_dataset(DATASET, valid_dataset_files() | {"config.toml": config})

    ingest(sqs_event(f"{DATASET}/config.toml"))

    [job] = jobs(cloud)
    assert job.status is JobStatus.REJECTED
    [error] = job.errors
    assert (error.code, error.path) == (ErrorCode.INVALID_CONFIG, "sdxl")
    assert "sdxl = true contradicts" in error.message and "FLUX.1" in error.message
    assert 'model_family = "flux1"' in error.message
    assert executions(cloud) == []


def test_given_unknown_hub_model_when_ingested_then_standard_compute_and_a_warning_naming_the_key(
    cloud: Cloud, ingest: Ingest
) -> None:
    config = b'pretrained_model_name_or_path = "someone/merged-model"\nresolution = 64\n'
    upload_dataset(DATASET, valid_dataset_files() | {"config.toml": config})

    ingest(sqs_event(f"{DATASET}/config.toml"))

    [job] = jobs(cloud)
    assert job.status is JobStatus.QUEUED
    assert (job.model_family, job.compute) == (None, "standard")
    [warning] = [w for w in job.warnings if w.path == "model_family"]
    assert warning.code is ErrorCode.SETTING_ADJUSTED
    assert "someone/merged-model" in warning.message


def test_given_published_flux_id_and_its_claim_when_ingested_then_large_compute(
    cloud: Cloud, ingest: Ingest
) -> None:
    config = b'pretrained_model_name_or_path = "black-forest-labs/FLUX.1-dev"\nmodel_family = "flux1"\n'
    upload_dataset(DATASET, valid_dataset_files() | {"config.toml": config + b"resolution = 64\n"})

    ingest(sqs_event(f"{DATASET}/config.toml"))

    [job] = jobs(cloud)
    assert (job.status, job.model_family, job.compute) == (JobStatus.QUEUED, "flux1", "large")
