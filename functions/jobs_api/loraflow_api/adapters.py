"""The only boto3 code of JobsApiFunction: DynamoDB reads, S3 presigned URLs and progress reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from aws_lambda_powertools import Logger
from botocore.config import Config
from botocore.exceptions import ClientError
from loraflow_shared.jobs.model import progress_key
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.s3 import parse_s3_uri

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


def build_queries(settings: ApiSettings) -> JobQueries:
    # SigV4 URLs: required for KMS-encrypted objects, and SigV2 is deprecated.
    s3 = boto3.client("s3", config=Config(signature_version="s3v4"))
    return JobQueries(
        repository=JobRepository(boto3.resource("dynamodb").Table(settings.jobs_table)),
        signer=S3UrlSigner(s3, settings.url_expiry_seconds),
        progress=S3ProgressReader(s3, settings.artifacts_bucket),
    )
