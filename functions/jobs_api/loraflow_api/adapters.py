"""The only boto3 code of JobsApiFunction: DynamoDB reads, S3 presigned URLs and progress reads."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import boto3
from aws_lambda_powertools import Logger
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.jobs.async_inference_aws import SageMakerAsyncEndpoints
from loraflow_shared.jobs.control_aws import build_control
from loraflow_shared.jobs.model import preview_request_key, progress_key
from loraflow_shared.jobs.preview_timing import GENERATION_TIMEOUTS
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.notifications import Notifier
from loraflow_shared.s3 import parse_s3_uri, s3_uri

from loraflow_api.generations import Generations
from loraflow_api.logic import JobQueries
from loraflow_api.settings import ApiSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = Logger(child=True)


class S3UrlSigner:
    def __init__(self, client: S3Client, expiry_seconds: int) -> None:
        self._client = client
        self._expiry_seconds = expiry_seconds

    def presign(self, s3_uri: str) -> str:
        bucket, key = parse_s3_uri(s3_uri)
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self._expiry_seconds
        )


class S3ProgressReader:
    """Reads `progress.json` from the training job's checkpoint prefix in the artifacts bucket."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    def read_progress(self, job_id: str) -> bytes | None:
        key = progress_key(job_id)
        try:
            return self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
        except self._client.exceptions.NoSuchKey:
            return None  # the trainer has not reported its first step yet
        except ClientError as exc:
            # Progress is an extra: the job itself must stay readable when S3 refuses this one read.
            logger.warning(
                "cannot read progress.json", key=key, code=exc.response.get("Error", {}).get("Code")
            )
            return None


class AsyncRenderSubmitter:
    """A generation's request: its JSON under `async-inference/requests/`, then InvokeEndpointAsync."""

    def __init__(self, client: S3Client, endpoints: SageMakerAsyncEndpoints, bucket: str) -> None:
        self._client = client
        self._endpoints = endpoints
        self._bucket = bucket

    def submit(self, endpoint_name: str, request: PreviewRequest, inference: str) -> None:
        key = preview_request_key(inference)
        try:
            self._client.put_object(
                Bucket=self._bucket,
                Key=key,
                Body=request.model_dump_json().encode(),
                ContentType="application/json",
            )
            self._endpoints.invoke_async(
                endpoint_name, s3_uri(self._bucket, key), inference, GENERATION_TIMEOUTS
            )
        except (ClientError, BotoCoreError) as exc:
            message = f"the preview endpoint {endpoint_name} did not take the request: {exc}"
            raise LoraflowError(ErrorCode.PREVIEW_FAILED, message) from exc


def signing_config(environ: Mapping[str, str]) -> Config:
    """How presigned URLs are built: SigV4, on the bucket's regional virtual host unless an endpoint is set.

    botocore otherwise signs for the global host `bucket.s3.amazonaws.com`; outside us-east-1 a new
    bucket answers it with a redirect the signature does not survive (S3 "Request routing"; regions
    launched after March 2019 answer 400). With virtual addressing and the client's region the URL names
    `bucket.s3.<region>.amazonaws.com`. SigV4 is also required for KMS-encrypted objects.
    An endpoint configured the SDK's way (AWS_ENDPOINT_URL[_S3], AWS SDKs "Service-specific endpoints":
    the local cloud, an S3-compatible store) is addressed path style: virtual hosts there would be
    `bucket.localhost`, which need not resolve.
    """
    ignored = environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true"
    configured = not ignored and bool(environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"))
    return Config(signature_version="s3v4", s3={"addressing_style": "path" if configured else "virtual"})


def signing_s3_client(environ: Mapping[str, str] = os.environ) -> S3Client:
    """The API's S3 client (the region and any endpoint come from the SDK's usual configuration)."""
    return boto3.client("s3", config=signing_config(environ))


def build_queries(settings: ApiSettings, environ: Mapping[str, str] = os.environ) -> JobQueries:
    s3 = signing_s3_client(environ)
    repository = JobRepository(boto3.resource("dynamodb").Table(settings.jobs_table))
    clients = {
        "stepfunctions": boto3.client("stepfunctions"),
        "sagemaker": boto3.client("sagemaker"),
        "s3": s3,
        "sqs": boto3.client("sqs"),
    }
    control = build_control(
        repository,
        Notifier(boto3.client("sns"), settings.notification_topic_arn),
        clients,
        settings.state_machine_arn,
        settings.artifacts_bucket,
        settings.upload_queue_url,
    )
    return JobQueries(
        repository=repository,
        signer=S3UrlSigner(s3, settings.url_expiry_seconds),
        progress=S3ProgressReader(s3, settings.artifacts_bucket),
        control=control,
    )


def build_generations(settings: ApiSettings, environ: Mapping[str, str] = os.environ) -> Generations:
    s3 = signing_s3_client(environ)
    return Generations(
        repository=JobRepository(boto3.resource("dynamodb").Table(settings.jobs_table)),
        submitter=AsyncRenderSubmitter(
            s3, SageMakerAsyncEndpoints(boto3.client("sagemaker-runtime")), settings.artifacts_bucket
        ),
        endpoints=settings.preview_endpoints,
        artifacts_bucket=settings.artifacts_bucket,
        signer=S3UrlSigner(s3, settings.url_expiry_seconds),
    )
