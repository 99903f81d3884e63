"""The S3 event notification carried in each SQS message body, parsed into the datasets it touches."""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote_plus

from loraflow_shared.dataset.layout import dataset_id
from loraflow_shared.errors import LoraflowError
from pydantic import BaseModel, ConfigDict, Field

TEST_EVENT = "s3:TestEvent"


class _Lenient(BaseModel):
    # Only the fields we use are declared; S3 adds fields over time and moto sends fewer.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class S3ObjectRef(_Lenient):
    key: str


class S3BucketRef(_Lenient):
    name: str


class S3Entity(_Lenient):
    bucket: S3BucketRef
    object_: S3ObjectRef = Field(alias="object")


class S3Record(_Lenient):
    event_name: str = Field(alias="eventName")
    s3: S3Entity

    @property
    def key(self) -> str:
        """The object key, decoded: S3 sends keys `quote_plus`-encoded (`a+b%2B.png` is `a b+.png`)."""
        return unquote_plus(self.s3.object_.key)


class S3Notification(_Lenient):
    records: list[S3Record] = Field(default_factory=list, alias="Records")
    event: str | None = Field(default=None, alias="Event")  # only set on `s3:TestEvent`

    @property
    def is_test_event(self) -> bool:
        return self.event == TEST_EVENT


class DatasetRef(NamedTuple):
    bucket: str
    dataset: str


def datasets_in(notification: S3Notification) -> tuple[set[DatasetRef], list[str]]:
    """The datasets whose objects changed, and the keys that belong to no dataset (bucket root)."""
    datasets: set[DatasetRef] = set()
    outside: list[str] = []
    for record in notification.records:
        try:
            datasets.add(DatasetRef(record.s3.bucket.name, dataset_id(record.key)))
        except LoraflowError:
            outside.append(record.key)
    return datasets, outside
