"""Validate a dataset folder on disk with the same rules as an upload to S3.

``root`` is the folder that holds the dataset folder (like a bucket holds ``<dataset>/``), so keys
are ``<dataset>/<relative path>`` exactly as in S3.
"""

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from loraflow_shared.dataset.objects import ObjectInfo, ObjectReader


class LocalDirectoryReader:
    """``ObjectReader`` over files under ``root``; a key never resolves outside it."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with self._path(key).open("rb") as file:
            file.seek(start)
            return file.read(max(0, end - start + 1))

    def read_all(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def _path(self, key: str) -> Path:
        path = (self._root / key).resolve()
        if not path.is_relative_to(self._root):
            raise ValueError(f"key {key!r} resolves outside {self._root}")
        return path


def local_directory_reader(root: str | Path) -> ObjectReader:
    return LocalDirectoryReader(Path(root))


def list_local_objects(root: str | Path, dataset: str) -> list[ObjectInfo]:
    """List ``root/dataset`` like S3 would: every file, with an MD5 ETag (S3's single-part ETag)."""
    base = Path(root) / dataset
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder {base} does not exist")
    objects = []
    for path in sorted(candidate for candidate in base.rglob("*") if candidate.is_file()):
        stat = path.stat()
        with path.open("rb") as file:
            etag = hashlib.file_digest(file, "md5").hexdigest()
        objects.append(
            ObjectInfo(
                key=f"{dataset}/{path.relative_to(base).as_posix()}",
                size=stat.st_size,
                etag=etag,
                last_modified=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
            )
        )
    return objects
