"""An in-memory bucket for validation tests: the ObjectReader and listing over a dict."""

import hashlib
from datetime import UTC, datetime

from loraflow_shared.dataset.objects import ObjectInfo


class MemoryBucket:
    """Objects by full key; reads are recorded so tests can assert what was fetched."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = dict(objects)
        self.ranges: list[tuple[str, int, int]] = []
        self.full_reads: list[str] = []

    def read_range(self, key: str, start: int, end: int) -> bytes:
        self.ranges.append((key, start, end))
        return self.objects[key][start : end + 1]

    def read_all(self, key: str) -> bytes:
        self.full_reads.append(key)
        return self.objects[key]

    def listing(self, etags: dict[str, str] | None = None) -> list[ObjectInfo]:
        """Objects as S3 lists them: single-part ETag = MD5 of the content, unless overridden."""
        etags = etags or {}
        return [
            ObjectInfo(
                key=key,
                size=len(data),
                etag=etags.get(key, hashlib.md5(data).hexdigest()),
                last_modified=datetime(2025, 1, 1, tzinfo=UTC),
            )
            for key, data in sorted(self.objects.items())
        ]
