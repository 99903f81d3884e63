"""What validation needs from storage: a listing entry and a reader. No boto3, no Pillow here,
so lightweight users (job fingerprints, the API) can import these without the image code."""

from datetime import datetime
from typing import Protocol

from pydantic import BaseModel


class ObjectInfo(BaseModel):
    """One listed object; ``key`` is the full bucket key ``<dataset>/...``."""

    key: str
    size: int
    etag: str
    last_modified: datetime


class ObjectReader(Protocol):
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start..end`` inclusive, like an HTTP Range header."""
        ...

    def read_all(self, key: str) -> bytes: ...
