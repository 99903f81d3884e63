"""S3 helpers shared by the functions and the containers: URIs, listings, ranged reads.

Clients are passed in (never created here) so callers decide how they are configured; plain boto3
clients pick up `AWS_ENDPOINT_URL` by themselves, which is how the same code runs locally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from loraflow_shared.dataset.objects import ObjectInfo

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_SCHEME = "s3://"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into `(bucket, key)`; the key may be empty or end with `/`."""
    if not uri.startswith(_SCHEME):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


def s3_uri(bucket: str, key: str) -> str:
    return f"{_SCHEME}{bucket}/{key}"


def list_objects(client: S3Client, bucket: str, prefix: str) -> list[ObjectInfo]:
    """Every object under `prefix`, with ETags unquoted (S3 returns them wrapped in `"`)."""
    objects: list[ObjectInfo] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            objects.append(
                ObjectInfo(
                    key=item["Key"],
                    size=item["Size"],
                    etag=item["ETag"].strip('"'),
                    last_modified=item["LastModified"],
                )
            )
    return objects


class S3ObjectReader:
    """`ObjectReader` over one bucket: ranged GETs so validation never downloads whole images."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes `start..end` inclusive (HTTP Range semantics; S3 clips a range past the end)."""
        try:
            response: Any = self._client.get_object(
                Bucket=self._bucket, Key=key, Range=f"bytes={start}-{end}"
            )
        except ClientError as exc:
            # S3 answers 416 for a range starting past the end (e.g. any range of an empty object).
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            raise
        return bytes(response["Body"].read())

    def read_all(self, key: str) -> bytes:
        response: Any = self._client.get_object(Bucket=self._bucket, Key=key)
        return bytes(response["Body"].read())


MAX_SMALL_TEXT_BYTES = 1024 * 1024  # a model_index.json is a few hundred bytes


def read_small_text(client: S3Client, uri: str) -> str | None:
    """The UTF-8 text of a small object, None when it is missing, unreadable to us, too large or not text:
    for facts that are only known when available (e.g. which family a base model folder holds)."""
    bucket, key = parse_s3_uri(uri)
    try:
        response: Any = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_SMALL_TEXT_BYTES}")
        body = bytes(response["Body"].read())
    except ClientError:
        return None
    if len(body) > MAX_SMALL_TEXT_BYTES:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None
