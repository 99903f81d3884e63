"""The only boto3 code of PipelineTasksFunction: S3 artifacts, the async endpoint, DynamoDB, SNS."""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

import boto3
from loraflow_shared.base_model_mirror import MirrorStore
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.jobs.async_inference_aws import SageMakerAsyncEndpoints
from loraflow_shared.jobs.preview_timing import preview_timeouts
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier
from loraflow_shared.s3 import parse_s3_uri

from loraflow_pipeline.logic import PipelineTasks
from loraflow_pipeline.settings import PipelineSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def _member_name(name: str) -> str:
    """`./pytorch_lora_weights.safetensors` and `pytorch_lora_weights.safetensors` are the same member."""
    return posixpath.normpath(name).lstrip("/")


class _ForwardOnly:
    """Only `read`: a member of a streamed tar cannot seek (and raises when asked whether it can),
    so s3transfer must take its non-seekable upload path."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source

    def read(self, size: int = -1) -> bytes:
        return self._source.read(size)


class S3ArtifactStore:
    def __init__(self, client: S3Client) -> None:
        self._s3 = client

    def unpack_model_archive(
        self, archive_uri: str, destination_for: Callable[[str], str | None]
    ) -> dict[str, str]:
        """Stream `model.tar.gz` member by member (`r|gz`): the archive never sits in memory or on disk.

        Each file member whose name `destination_for` maps to a URI is copied there (the first of
        duplicates wins); returns member name -> URI of what was copied.
        """
        bucket, key = parse_s3_uri(archive_uri)
        try:
            body = self._s3.get_object(Bucket=bucket, Key=key)["Body"]
        except self._s3.exceptions.NoSuchKey as exc:
            raise LoraflowError(
                ErrorCode.TRAINING_FAILED, f"model artifacts not found at {archive_uri}"
            ) from exc
        copied: dict[str, str] = {}
        try:
            with tarfile.open(fileobj=body, mode="r|gz") as archive:
                for member in archive:
                    name = _member_name(member.name)
                    source = archive.extractfile(member) if member.isfile() else None
                    destination = destination_for(name) if source is not None else None
                    if source is None or destination is None or name in copied:
                        continue
                    target_bucket, target_key = parse_s3_uri(destination)
                    forward_only: Any = _ForwardOnly(source)  # duck-typed: s3transfer only calls read()
                    self._s3.upload_fileobj(forward_only, target_bucket, target_key)
                    copied[name] = destination
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise LoraflowError(
                ErrorCode.TRAINING_FAILED,
                f"model artifacts at {archive_uri} are not a readable tar.gz: {exc}",
            ) from exc
        finally:
            body.close()
        return copied

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = parse_s3_uri(uri)
        return self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def put_json(self, uri: str, body: str) -> None:
        bucket, key = parse_s3_uri(uri)
        self._s3.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/json")


def build_tasks(settings: PipelineSettings) -> PipelineTasks:
    s3 = boto3.client("s3")
    return PipelineTasks(
        repository=JobRepository(boto3.resource("dynamodb").Table(settings.jobs_table)),
        notifier=Notifier(boto3.client("sns"), settings.notification_topic_arn),
        artifacts=S3ArtifactStore(s3),
        endpoints=SageMakerAsyncEndpoints(boto3.client("sagemaker-runtime")),
        mirrors=MirrorStore(s3, settings.artifacts_bucket),
        targets=settings.targets,
        artifacts_bucket=settings.artifacts_bucket,
        preview_timeouts=preview_timeouts(settings.preview_timeout_seconds),
        capacity_wait_seconds=settings.capacity_wait_seconds,
        prices=settings.prices,
    )
