"""Small S3 helpers for the SageMaker emulators (plain boto3: the endpoint comes from the environment)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` → (bucket, key); the key may be empty."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join_s3_uri(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *(part.strip("/") for part in parts)])


def download_prefix(s3: Any, uri: str, target: Path) -> int:
    """Download every object under the S3 prefix into `target`, keeping keys relative to it; return the count.

    SageMaker's S3Prefix channels match keys by string prefix, which is what ListObjectsV2 does too.
    """
    bucket, prefix = split_s3_uri(uri)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = PurePosixPath(item["Key"][len(prefix) :].lstrip("/"))
            if not relative.parts or ".." in relative.parts:
                continue  # a "folder" marker object, or a key that would escape the channel folder
            destination = target.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(destination))
            count += 1
    return count
