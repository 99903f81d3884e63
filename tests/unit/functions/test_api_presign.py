"""Presigned URLs name the bucket's regional host on AWS, a configured endpoint's host locally."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
from loraflow_api.adapters import S3UrlSigner, signing_s3_client
from moto.server import ThreadedMotoServer

BUCKET = "loraflow-artifacts"
KEY = "jobs/j1/lora/pytorch_lora_weights.safetensors"


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield int(server.get_host_and_port()[1])
    server.stop()


@pytest.mark.parametrize("region", ["eu-west-1", "ap-southeast-3"])
def test_given_aws_region_and_no_endpoint_when_presigned_then_url_names_the_regional_virtual_host(
    credentials: None, monkeypatch: pytest.MonkeyPatch, region: str
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)

    url = urlparse(S3UrlSigner(signing_s3_client(), 600).presign(f"s3://{BUCKET}/{KEY}"))

    query = parse_qs(url.query)
    assert (url.scheme, url.netloc, url.path) == ("https", f"{BUCKET}.s3.{region}.amazonaws.com", f"/{KEY}")
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert f"/{region}/s3/aws4_request" in query["X-Amz-Credential"][0]
    assert query["X-Amz-Expires"] == ["600"]


def test_given_endpoints_ignored_when_presigned_then_url_names_the_regional_virtual_host(
    credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost:1")
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")

    url = urlparse(S3UrlSigner(signing_s3_client(), 600).presign(f"s3://{BUCKET}/{KEY}"))

    assert url.netloc == f"{BUCKET}.s3.eu-west-1.amazonaws.com"


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_given_configured_endpoint_when_presigned_then_url_is_path_style_there_and_downloads(
    credentials: None, monkeypatch: pytest.MonkeyPatch, moto_port: int, variable: str, host: str
) -> None:
    # The local cloud's world: the SDK is pointed at a local server, the code is the same.
    endpoint = f"http://{host}:{moto_port}"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv(variable, endpoint)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=b"lora bytes")

    presigned = S3UrlSigner(signing_s3_client(), 600).presign(f"s3://{BUCKET}/{KEY}")

    url = urlparse(presigned)
    assert (url.netloc, url.path) == (f"{host}:{moto_port}", f"/{BUCKET}/{KEY}")
    with urllib.request.urlopen(presigned, timeout=10) as response:
        assert response.read() == b"lora bytes"
    s3.delete_object(Bucket=BUCKET, Key=KEY)
    s3.delete_bucket(Bucket=BUCKET)
