"""SageMaker's `CheckpointConfig` for a local training job: the checkpoint folder mirrored to S3.

Behaviour copied from SageMaker: what is under `S3Uri` is copied into the folder before the container
starts (that is how a job resumes after a spot interruption); while it runs, new and changed files
are uploaded and files deleted locally are deleted in S3; objects added to S3 after the start are
not copied in. SageMaker does not say how often it syncs: here every `interval_s`, and once more
when the process ends, whatever its outcome. `S3Uri` is treated as a folder (`…/name/`), so
`checkpoints/job-1` never picks up `checkpoints/job-10/…`.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraflow_local.s3_util import download_prefix, split_s3_uri

LOG = logging.getLogger(__name__)

FileState = tuple[int, int]  # (size, mtime_ns): a change in either means upload again


class CheckpointSync:
    def __init__(self, s3: Any, s3_uri: str, directory: Path, interval_s: float) -> None:
        bucket, prefix = split_s3_uri(s3_uri)
        self._s3 = s3
        self._bucket = bucket
        self._prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        self._directory = directory
        self._interval_s = interval_s
        self._synced: dict[str, FileState] = {}
        self._lock = threading.Lock()  # the poller and the final sync never run at once

    def restore(self) -> int:
        """Copy what S3 holds into the folder (before the container starts); return the file count."""
        count = download_prefix(self._s3, f"s3://{self._bucket}/{self._prefix}", self._directory)
        self._synced = self._local_files()  # restored files are in S3 already
        return count

    def sync(self) -> None:
        """Upload new or changed files and delete in S3 what disappeared locally since the last sync."""
        with self._lock:
            current = self._local_files()
            for relative, state in current.items():
                if self._synced.get(relative) != state and self._upload(relative):
                    self._synced[relative] = state
            for relative in sorted(set(self._synced) - set(current)):
                self._s3.delete_object(Bucket=self._bucket, Key=self._prefix + relative)
                del self._synced[relative]

    @contextmanager
    def running(self) -> Iterator[None]:
        """Sync in the background while the block runs, then once more at its end."""
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(stop,), name="checkpoint-sync", daemon=True)
        poller.start()
        try:
            yield
        finally:
            stop.set()
            poller.join()
            self.sync()

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval_s):
            try:
                self.sync()
            except Exception:  # S3 trouble mid-run: the next round retries; the final sync reports
                LOG.warning("checkpoint sync to s3://%s/%s failed", self._bucket, self._prefix, exc_info=True)

    def _upload(self, relative: str) -> bool:
        """False when the file vanished meanwhile (a trainer rotating its checkpoints)."""
        try:
            self._s3.upload_file(str(self._directory / relative), self._bucket, self._prefix + relative)
        except FileNotFoundError:
            return False
        return True

    def _local_files(self) -> dict[str, FileState]:
        """Regular files under the folder; os.walk skips folders that vanish while it walks."""
        files: dict[str, FileState] = {}
        for root, _folders, names in os.walk(self._directory):
            for name in names:
                path = Path(root, name)
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    files[path.relative_to(self._directory).as_posix()] = (info.st_size, info.st_mtime_ns)
        return files
