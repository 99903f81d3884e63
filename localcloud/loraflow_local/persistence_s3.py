"""S3's part of a local cloud's saved state: every bucket's objects, through the S3 API.

Saved per object: key, content (in a content-addressed folder, so a save only downloads what changed since
the last one), content type, user metadata, the other content headers, and for a multipart upload its part
sizes (HeadObject `PartNumber`). Restored with the same parts, so every object gets its old ETag back: the
ingest function fingerprints datasets by `(key, etag, size)`, and a changed ETag would look like a new
dataset version and train it again. LastModified is the time of the restore (S3 has no way to set it).
While a bucket's objects are restored its event notifications are off, so a restore sends no upload events.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from botocore.exceptions import ClientError

LOG = logging.getLogger(__name__)

_HEADERS = ("CacheControl", "ContentDisposition", "ContentEncoding", "ContentLanguage")
_NOTIFICATION_KEYS = (
    "QueueConfigurations",
    "TopicConfigurations",
    "LambdaFunctionConfigurations",
    "EventBridgeConfiguration",
)
_MULTIPART_ETAG = re.compile(r'^"?[0-9a-f]{32}-(\d+)"?$')
_CHUNK = 1024 * 1024
_T = TypeVar("_T")


class S3Snapshot:
    name = "s3"

    def __init__(self, s3: Any, blob_dir: Path, region: str, workers: int = 4) -> None:
        self._s3 = s3
        self._blobs = blob_dir
        self._region = region
        self._workers = workers

    def save(self, previous: Mapping[str, Any] | None) -> dict[str, Any]:
        """Every bucket's objects; content already saved under the same ETag and size is not fetched again."""
        self._blobs.mkdir(parents=True, exist_ok=True)
        known = _entries(previous)
        buckets: dict[str, list[dict[str, Any]]] = {}
        with ThreadPoolExecutor(self._workers) as pool:
            for bucket in sorted(item["Name"] for item in self._s3.list_buckets()["Buckets"]):
                listed = _gone_is_none(self._list, bucket) or []
                reused = [known[(bucket, o["Key"])] for o in listed if self._still_saved(known, bucket, o)]
                missing = [o["Key"] for o in listed if not self._still_saved(known, bucket, o)]
                fetched = pool.map(partial(_gone_is_none, self._fetch, bucket), missing)
                entries = reused + [entry for entry in fetched if entry is not None]
                buckets[bucket] = sorted(entries, key=lambda entry: entry["key"])
        return {"buckets": buckets}

    def committed(self, saved: Mapping[str, Any]) -> None:
        """Delete content no saved object refers to any more (after the state file naming them is written)."""
        referenced = {entry["blob"] for entries in saved.get("buckets", {}).values() for entry in entries}
        for blob in self._blobs.glob("*"):  # also a crashed save's `.incoming-` files: saves never overlap
            if blob.name not in referenced:
                blob.unlink(missing_ok=True)

    def restore(self, saved: Mapping[str, Any]) -> dict[str, int]:
        existing = {item["Name"] for item in self._s3.list_buckets()["Buckets"]}
        restored = changed = 0
        with ThreadPoolExecutor(self._workers) as pool:
            for bucket, entries in saved.get("buckets", {}).items():
                if bucket not in existing:
                    self._create_bucket(bucket)
                with notifications_suspended(self._s3, bucket):
                    same = list(pool.map(partial(self._put, bucket), entries))
                restored += len(same)
                changed += same.count(False)
        return {"objects": restored, "objects_with_new_etag": changed}

    def _list(self, bucket: str) -> list[dict[str, Any]]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item for page in pages for item in page.get("Contents", [])]

    def _still_saved(
        self, known: Mapping[tuple[str, str], Any], bucket: str, listed: Mapping[str, Any]
    ) -> bool:
        entry = known.get((bucket, listed["Key"]))
        return (
            entry is not None
            and (entry["etag"], entry["size"]) == (listed["ETag"], listed["Size"])
            and (self._blobs / entry["blob"]).is_file()
        )

    def _fetch(self, bucket: str, key: str) -> dict[str, Any]:
        response = self._s3.get_object(Bucket=bucket, Key=key)
        entry: dict[str, Any] = {
            "key": key,
            "etag": response["ETag"],
            "size": response["ContentLength"],
            "blob": self._store(response["Body"]),
            "content_type": response.get("ContentType"),
            "metadata": response.get("Metadata") or {},
            "headers": {name: response[name] for name in _HEADERS if response.get(name)},
        }
        parts = self._part_sizes(bucket, key, response["ETag"])
        if parts is not None and sum(parts) == entry["size"]:
            entry["parts"] = parts
        return entry

    def _part_sizes(self, bucket: str, key: str, etag: str) -> list[int] | None:
        found = _MULTIPART_ETAG.match(etag)
        if found is None:
            return None
        count = int(found.group(1))
        return [
            int(self._s3.head_object(Bucket=bucket, Key=key, PartNumber=number)["ContentLength"])
            for number in range(1, count + 1)
        ]

    def _store(self, body: Any) -> str:
        digest = hashlib.sha256()
        handle, temporary = tempfile.mkstemp(dir=self._blobs, prefix=".incoming-")
        with os.fdopen(handle, "wb") as file:
            for chunk in iter(lambda: body.read(_CHUNK), b""):
                digest.update(chunk)
                file.write(chunk)
        name = digest.hexdigest()
        os.replace(temporary, self._blobs / name)
        return name

    def _create_bucket(self, bucket: str) -> None:
        if self._region == "us-east-1":
            self._s3.create_bucket(Bucket=bucket)
        else:
            self._s3.create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self._region}
            )

    def _put(self, bucket: str, entry: Mapping[str, Any]) -> bool:
        """Upload one saved object; True when it got its saved ETag back."""
        arguments: dict[str, Any] = {"Bucket": bucket, "Key": entry["key"], "Metadata": entry["metadata"]}
        arguments.update(entry.get("headers") or {})
        if entry.get("content_type"):
            arguments["ContentType"] = entry["content_type"]
        path = self._blobs / entry["blob"]
        if entry.get("parts"):
            etag = _put_in_parts(self._s3, arguments, path, entry["parts"])
        else:
            with path.open("rb") as body:
                etag = self._s3.put_object(Body=body, **arguments)["ETag"]
        if etag != entry["etag"]:
            LOG.warning(
                "s3://%s/%s restored with ETag %s (saved: %s)", bucket, entry["key"], etag, entry["etag"]
            )
        return bool(etag == entry["etag"])


def _put_in_parts(s3: Any, arguments: Mapping[str, Any], path: Path, parts: list[int]) -> str:
    """A multipart upload with the saved part sizes: S3's multipart ETag depends on them."""
    upload = s3.create_multipart_upload(**arguments)["UploadId"]
    target = {"Bucket": arguments["Bucket"], "Key": arguments["Key"], "UploadId": upload}
    uploaded = []
    with path.open("rb") as file:
        for number, size in enumerate(parts, start=1):
            part = s3.upload_part(Body=file.read(size), PartNumber=number, **target)
            uploaded.append({"ETag": part["ETag"], "PartNumber": number})
    done = s3.complete_multipart_upload(MultipartUpload={"Parts": uploaded}, **target)
    return str(done["ETag"])


@contextmanager
def notifications_suspended(s3: Any, bucket: str) -> Iterator[None]:
    """The bucket's event notifications off while the block runs, then put back as they were."""
    configuration = s3.get_bucket_notification_configuration(Bucket=bucket)
    configuration = {key: configuration[key] for key in _NOTIFICATION_KEYS if key in configuration}
    if not configuration:
        yield
        return
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={})
    try:
        yield
    finally:
        s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration=configuration)


def _gone_is_none(call: Callable[..., _T], *arguments: Any) -> _T | None:
    """`call(*arguments)`, or None when the bucket or object was deleted meanwhile (a save skips it)."""
    try:
        return call(*arguments)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "NoSuchBucket", "404"):
            return None
        raise


def _entries(previous: Mapping[str, Any] | None) -> dict[tuple[str, str], Any]:
    buckets = (previous or {}).get("buckets", {})
    return {(bucket, entry["key"]): entry for bucket, entries in buckets.items() for entry in entries}
