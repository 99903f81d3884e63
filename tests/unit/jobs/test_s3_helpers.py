from __future__ import annotations

import boto3
import pytest
from jobs_aws import REGION
from loraflow_shared.s3 import S3ObjectReader, list_objects, parse_s3_uri, s3_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b c.png", ("bucket", "a/b c.png")),
        ("s3://bucket/prefix/", ("bucket", "prefix/")),
        ("s3://bucket", ("bucket", "")),
    ],
)
def test_given_s3_uri_when_parsed_then_bucket_and_key(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected
    assert parse_s3_uri(s3_uri(*expected)) == expected


@pytest.mark.parametrize("uri", ["https://bucket/key", "s3:///key", "bucket/key"])
def test_given_not_an_s3_uri_when_parsed_then_value_error(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_s3_uri(uri)


@pytest.fixture
def bucket(aws: None) -> str:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket="datasets")
    s3.put_object(Bucket="datasets", Key="ds/20_x dog/img 1.png", Body=bytes(range(256)) * 4)
    s3.put_object(Bucket="datasets", Key="ds/empty.txt", Body=b"")
    s3.put_object(Bucket="datasets", Key="ds-other/config.toml", Body=b"x")
    return "datasets"


def test_given_objects_when_listed_under_prefix_then_only_that_prefix_with_bare_etags(bucket: str) -> None:
    objects = list_objects(boto3.client("s3", region_name=REGION), bucket, "ds/")
    assert sorted(obj.key for obj in objects) == ["ds/20_x dog/img 1.png", "ds/empty.txt"]
    assert all(obj.etag and '"' not in obj.etag for obj in objects)
    assert {obj.key: obj.size for obj in objects}["ds/20_x dog/img 1.png"] == 1024


def test_given_object_when_ranges_read_then_inclusive_and_clipped_at_the_end(bucket: str) -> None:
    reader = S3ObjectReader(boto3.client("s3", region_name=REGION), bucket)
    data = bytes(range(256)) * 4
    assert reader.read_range("ds/20_x dog/img 1.png", 0, 9) == data[:10]
    assert reader.read_range("ds/20_x dog/img 1.png", 1000, 5000) == data[1000:]
    assert reader.read_all("ds/20_x dog/img 1.png") == data


def test_given_empty_object_when_range_read_then_empty_bytes(bucket: str) -> None:
    reader = S3ObjectReader(boto3.client("s3", region_name=REGION), bucket)
    assert reader.read_range("ds/empty.txt", 0, 1023) == b""
