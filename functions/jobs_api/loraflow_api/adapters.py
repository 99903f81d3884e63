"""The only boto3 code of JobsApiFunction: DynamoDB reads and S3 presigned URLs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from loraflow_shared.jobs.repository import JobRepository
from loraflow_shared.s3 import parse_s3_uri

from loraflow_api.logic import JobQueries
from loraflow_api.settings import ApiSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3UrlSigner:
    def __init__(self, client: S3Client, expiry_seconds: int) -> None:
        self._client = client
        self._expiry_seconds = expiry_seconds

    def presign(self, s3_uri: str) -> str:
        bucket, key = parse_s3_uri(s3_uri)
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self._expiry_seconds
        )


def build_queries(settings: ApiSettings) -> JobQueries:
    return JobQueries(
        repository=JobRepository(boto3.resource("dynamodb").Table(settings.jobs_table)),
        # SigV4 URLs: required for KMS-encrypted objects, and SigV2 is deprecated.
        signer=S3UrlSigner(
            boto3.client("s3", config=Config(signature_version="s3v4")), settings.url_expiry_seconds
        ),
    )
