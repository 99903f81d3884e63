"""Put a dataset folder into the dataset bucket as `<dataset>/...`, the way `loraflow train` does: only the
files S3 does not already hold with the same content (so an interrupted upload resumes), in parallel, with
one byte progress bar; objects under the prefix that the folder no longer has are deleted, so the dataset
in S3 is the folder (as `aws s3 sync --delete`).

Files go up in one PUT each (images are far below S3's 5 GB limit), so an object's ETag is its MD5, the
same ETag `loraflow_shared.dataset.local` gives the file on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig
from loraflow_shared.dataset.local import list_local_objects
from loraflow_shared.dataset.objects import ObjectInfo
from tqdm import tqdm

WORKERS = 8
SINGLE_PUT = TransferConfig(multipart_threshold=5 * 1024**3, use_threads=False)


@dataclass(frozen=True)
class UploadResult:
    uploaded: list[str]
    skipped: list[str]  # already in S3 with the same content
    deleted: list[str]  # in S3 under the dataset, no longer in the folder
    uploaded_bytes: int


def upload_dataset(
    s3: Any, folder: Path, bucket: str, dataset: str, progress: Callable[..., Any] = tqdm
) -> UploadResult:
    local = {obj.key: obj for obj in _local_objects(folder, dataset)}
    remote = _remote_etags(s3, bucket, f"{dataset}/")
    todo = [obj for key, obj in local.items() if remote.get(key) != (obj.etag, obj.size)]
    total = sum(obj.size for obj in todo)
    with progress(total=total, unit="B", unit_scale=True, desc=f"uploading {dataset}") as bar:

        def put(obj: ObjectInfo) -> None:
            path = folder / obj.key.split("/", 1)[1]
            s3.upload_file(str(path), bucket, obj.key, Config=SINGLE_PUT, Callback=bar.update)

        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(put, todo))  # list(): raise the first failure here
    stale = sorted(set(remote) - set(local))
    for start in range(0, len(stale), 1000):  # DeleteObjects takes up to 1000 keys
        chunk = stale[start : start + 1000]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True})
    return UploadResult(
        uploaded=[obj.key for obj in todo],
        skipped=sorted(set(local) - {obj.key for obj in todo}),
        deleted=stale,
        uploaded_bytes=total,
    )


def _local_objects(folder: Path, dataset: str) -> list[ObjectInfo]:
    """The folder's files as keys under `dataset/`, with their MD5 ETags."""
    objects = list_local_objects(folder.parent, folder.name)
    return [obj.model_copy(update={"key": dataset + obj.key[len(folder.name) :]}) for obj in objects]


def _remote_etags(s3: Any, bucket: str, prefix: str) -> dict[str, tuple[str, int]]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = (item["ETag"].strip('"'), item["Size"])
    return found
