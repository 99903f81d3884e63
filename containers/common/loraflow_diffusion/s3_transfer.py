"""The containers' only boto3 code: whole-object downloads and uploads.

A plain client per call: it picks up `AWS_ENDPOINT_URL` (the local cloud) or the instance role (AWS)
by itself, and calls are few and slow anyway (model files, preview PNGs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.exceptions import ClientError
from loraflow_shared.s3 import list_objects, parse_s3_uri

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def _client() -> S3Client:
    return boto3.client("s3")


def download_prefix(uri: str, dest: Path) -> int:
    """Copy every object under the `s3://bucket/prefix/` URI into `dest`, keeping relative paths.

    Returns the number of files; raises FileNotFoundError when nothing is there.
    """
    bucket, prefix = parse_s3_uri(uri)
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    client = _client()
    keys = [o.key for o in list_objects(client, bucket, prefix) if not o.key.endswith("/")]
    if not keys:
        raise FileNotFoundError(f"no objects under {uri}")
    root = dest.resolve()
    for key in keys:
        target = (root / key[len(prefix) :]).resolve()
        if not target.is_relative_to(root):
            raise ValueError(f"object key {key!r} escapes the download folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))
    return len(keys)


def download_object(uri: str, dest: Path) -> Path:
    bucket, key = parse_s3_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _client().download_file(bucket, key, str(dest))
    return dest


def upload_bytes(data: bytes, uri: str, content_type: str) -> None:
    bucket, key = parse_s3_uri(uri)
    _client().put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


def exists(uri: str) -> bool:
    """Whether the object exists (HEAD); any answer other than "not found" is an error."""
    bucket, key = parse_s3_uri(uri)
    try:
        _client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True
