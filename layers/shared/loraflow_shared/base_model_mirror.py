"""The stack's base-model mirrors in S3 (names and rules: `loraflow_shared.base_models`).

Used by the pipeline (is a mirror published? take the lease), the trainer (write and publish it) and the
`loraflow models` command (list, pull, delete). The client is passed in, as in `loraflow_shared.s3`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from pydantic import ValidationError

from loraflow_shared.base_models import (
    HUB_MIRROR_PREFIX,
    MANIFEST_FILE,
    MirrorLease,
    MirrorManifest,
    lease_key,
    mirror_from_manifest_key,
    mirror_prefix,
)
from loraflow_shared.s3 import list_objects, s3_uri

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

LOG = logging.getLogger(__name__)
# S3's answers to a conditional write that lost: the object exists / another write raced ours.
_LOST_RACE = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


def _now() -> datetime:
    return datetime.now(UTC)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class MirrorStore:
    def __init__(self, client: S3Client, bucket: str, clock: Callable[[], datetime] = _now) -> None:
        self._client = client
        self._bucket = bucket
        self._clock = clock

    def uri(self, repo: str, commit: str) -> str:
        return s3_uri(self._bucket, mirror_prefix(repo, commit))

    def published(self, repo: str, commit: str) -> MirrorManifest | None:
        """The mirror's manifest when it is published and every file it lists is there, at its size."""
        prefix = mirror_prefix(repo, commit)
        manifest = self._manifest(prefix + MANIFEST_FILE)
        if manifest is None:
            return None
        present = {o.key[len(prefix) :]: o.size for o in list_objects(self._client, self._bucket, prefix)}
        missing = [path for path, size in manifest.files.items() if present.get(path) != size]
        if missing:
            LOG.warning(
                "mirror %s lacks %d of its files (e.g. %s): not used", prefix, len(missing), missing[0]
            )
            return None
        return manifest

    def all_published(self) -> list[MirrorManifest]:
        keys = [o.key for o in list_objects(self._client, self._bucket, HUB_MIRROR_PREFIX)]
        manifests = (self._manifest(key) for key in keys if mirror_from_manifest_key(key) is not None)
        return [manifest for manifest in manifests if manifest is not None]

    def _manifest(self, key: str) -> MirrorManifest | None:
        try:
            response: Any = self._client.get_object(Bucket=self._bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in {"NoSuchKey", "404"}:
                return None
            raise
        try:
            return MirrorManifest.model_validate_json(response["Body"].read())
        except ValidationError:
            LOG.warning("the mirror manifest %s is malformed: not used", key)
            return None

    def acquire_lease(self, repo: str, commit: str, holder: str, ttl_seconds: int) -> bool:
        """Take (or renew) the right to write this mirror. False while another holder's lease is live."""
        key = lease_key(repo, commit)
        body = MirrorLease(
            holder=holder, expires_at=(self._clock() + timedelta(seconds=ttl_seconds)).isoformat()
        ).model_dump_json()
        try:
            self._client.put_object(Bucket=self._bucket, Key=key, Body=body.encode(), IfNoneMatch="*")
            return True
        except ClientError as exc:
            if _code(exc) not in _LOST_RACE:
                raise
        current = self._lease(key)
        if current is None:
            return False  # written and released meanwhile, or unreadable: let the next job try
        lease, etag = current
        if lease.holder != holder and datetime.fromisoformat(lease.expires_at) > self._clock():
            return False
        try:  # our own lease again (a retried step), or an expired one: replace exactly what we read
            self._client.put_object(Bucket=self._bucket, Key=key, Body=body.encode(), IfMatch=etag)
            return True
        except ClientError as exc:
            if _code(exc) in _LOST_RACE or _code(exc) in {"NoSuchKey", "404"}:
                return False
            raise

    def _lease(self, key: str) -> tuple[MirrorLease, str] | None:
        try:
            response: Any = self._client.get_object(Bucket=self._bucket, Key=key)
            return MirrorLease.model_validate_json(response["Body"].read()), str(response["ETag"])
        except ClientError as exc:
            if _code(exc) in {"NoSuchKey", "404"}:
                return None
            raise
        except ValidationError:
            return None

    def release_lease(self, repo: str, commit: str, holder: str) -> None:
        key = lease_key(repo, commit)
        current = self._lease(key)
        if current is not None and current[0].holder == holder:
            self._client.delete_object(Bucket=self._bucket, Key=key)

    def upload(
        self,
        folder: Path,
        repo: str,
        commit: str,
        revision: str | None,
        holder: str,
        progress: Callable[[int], None] | None = None,
    ) -> MirrorManifest:
        """Upload every file under `folder`, then publish the manifest (last), then release the lease.
        `progress` is called with the bytes sent as they go (a progress bar's update)."""
        prefix = mirror_prefix(repo, commit)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        for relative, path in files.items():
            # upload_file: multipart and parallel for the multi-GB weights, as the AWS CLI does.
            self._client.upload_file(str(path), self._bucket, prefix + relative, Callback=progress)
        manifest = MirrorManifest(
            repo=repo,
            commit=commit,
            revision=revision,
            files={relative: path.stat().st_size for relative, path in files.items()},
            mirrored_at=self._clock().isoformat(),
            mirrored_by=holder,
        )
        self.publish(manifest)
        self.release_lease(repo, commit, holder)
        return manifest

    def publish(self, manifest: MirrorManifest) -> None:
        self._client.put_object(
            Bucket=self._bucket,
            Key=mirror_prefix(manifest.repo, manifest.commit) + MANIFEST_FILE,
            Body=manifest.model_dump_json(indent=1).encode(),
            ContentType="application/json",
        )

    def unpublish(self, repo: str, commit: str) -> None:
        """No job starts on it from now on (the files stay until `delete`)."""
        self._client.delete_object(Bucket=self._bucket, Key=mirror_prefix(repo, commit) + MANIFEST_FILE)

    def delete(self, repo: str, commit: str) -> int:
        """Unpublish (manifest first, so no new job picks it up midway), then delete the files."""
        prefix = mirror_prefix(repo, commit)
        self.unpublish(repo, commit)
        keys = [o.key for o in list_objects(self._client, self._bucket, prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys per call
            batch: list[Any] = [{"Key": key} for key in keys[start : start + 1000]]
            self._client.delete_objects(Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)
