"""The only boto3 code of IngestDatasetFunction: S3 listings/reads (job control's adapters: the layer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from loraflow_shared.base_models import HubModel, mirror_prefix
from loraflow_shared.dataset.objects import ObjectInfo, ObjectReader
from loraflow_shared.dataset.validate import READ_THREADS
from loraflow_shared.errors import LoraflowError
from loraflow_shared.families import MODEL_INDEX_FILE
from loraflow_shared.hub import HubError, HubProblem, HubResolution, read_hub_text, resolve
from loraflow_shared.hub_token import read_hub_token
from loraflow_shared.jobs.control_aws import build_control
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier
from loraflow_shared.s3 import S3ObjectReader, list_objects, read_small_text, s3_uri

from loraflow_ingest.logic import Ingestor
from loraflow_ingest.settings import IngestSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3DatasetStore:
    def __init__(self, client: S3Client) -> None:
        self._client = client

    def list_objects(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        return list_objects(self._client, bucket, prefix)

    def reader(self, bucket: str) -> ObjectReader:
        return S3ObjectReader(self._client, bucket)

    def read_text(self, uri: str) -> str | None:
        return read_small_text(self._client, uri)


class SecretTokenHubResolver:
    """Resolves with the stack's Hugging Face token (read once, on first need, from Secrets Manager). A
    model_index.json the stack's copy of that commit holds is read from S3, not from the Hub."""

    def __init__(
        self, secret_arn: str, read_text: Callable[[str], str | None], artifacts_bucket: str
    ) -> None:
        self._secret_arn = secret_arn
        self._token: str | None = None
        self._read_text = read_text
        self._bucket = artifacts_bucket

    def resolve(self, model: HubModel) -> HubResolution:
        token = self._read_token()
        found = resolve(model, token, read_model_index=False)
        if not found.has_model_index:
            return found
        copied = self._read_text(
            s3_uri(self._bucket, mirror_prefix(model.repo, found.commit) + MODEL_INDEX_FILE)
        )
        index = copied if copied is not None else read_hub_text(model, found.commit, MODEL_INDEX_FILE, token)
        return replace(found, model_index=index)

    def _read_token(self) -> str | None:
        if self._secret_arn and self._token is None:
            try:
                self._token = read_hub_token(self._secret_arn, lambda: boto3.client("secretsmanager"))
            except LoraflowError as exc:
                raise HubError(HubProblem.NO_ACCESS, exc.message) from None
        return self._token


def build_ingestor(settings: IngestSettings) -> Ingestor:
    # Validation reads images on READ_THREADS threads through this one client: one pooled connection each.
    s3 = boto3.client("s3", config=Config(max_pool_connections=READ_THREADS))
    store = S3DatasetStore(s3)
    repository = JobRepository(boto3.resource("dynamodb").Table(settings.jobs_table))
    notifier = Notifier(boto3.client("sns"), settings.notification_topic_arn)
    clients = {
        "stepfunctions": boto3.client("stepfunctions"),
        "sagemaker": boto3.client("sagemaker"),
        "s3": s3,
    }
    return Ingestor(
        repository=repository,
        notifier=notifier,
        store=store,
        control=build_control(
            repository, notifier, clients, settings.state_machine_arn, settings.artifacts_bucket
        ),
        settle_seconds=settings.settle_seconds,
        default_base_model=settings.default_base_model,
        hub=SecretTokenHubResolver(settings.hf_token_secret_arn, store.read_text, settings.artifacts_bucket),
        large_models=settings.large_models_enabled,
    )
