"""A local cloud keeps its state across a stop and a start on the same state folder (`--fresh` discards it).

Checked as a user sees it: boto3 against the endpoints of the first and of the restarted cloud.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from loraflow_local.client import StackClient
from loraflow_local.cloud import LocalCloud
from loraflow_local.persistence_s3 import S3Snapshot

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
FAKE_TRAINER = (sys.executable, str(Path(__file__).parent / "fakes" / "fake_trainer.py"))


def _cloud(state: Path, **options: Any) -> LocalCloud:
    overrides = {"DefaultBaseModel": "s3://somewhere/base/", **options.pop("parameters", {})}
    return LocalCloud(state, parameter_overrides=overrides, save_interval_s=0, **options)


def _client(cloud: LocalCloud, service: str) -> Any:
    return StackClient(cloud.endpoints).client(service)


def _objects(s3: Any, bucket: str) -> dict[str, tuple[str, str, dict[str, str], bytes]]:
    """key → (ETag, content type, metadata, content)."""
    found = {}
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        got = s3.get_object(Bucket=bucket, Key=item["Key"])
        found[item["Key"]] = (got["ETag"], got["ContentType"], got["Metadata"], got["Body"].read())
    return found


def _user_state(cloud: LocalCloud, tmp_path: Path) -> dict[str, Any]:
    """What a user adds: objects (one uploaded in parts), an item, a bucket, a queue subscribed to a topic."""
    s3, sqs, sns = _client(cloud, "s3"), _client(cloud, "sqs"), _client(cloud, "sns")
    artifacts = cloud.endpoints["artifacts_bucket"]
    s3.put_object(
        Bucket=artifacts, Key="jobs/j1/a b+.txt", Body=b"hi", ContentType="text/x-a", Metadata={"k": "v"}
    )
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * MIB))
    s3.upload_file(
        str(big),
        artifacts,
        "checkpoints/t/state.bin",
        Config=TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB),
    )
    s3.create_bucket(Bucket="my-own-bucket")
    s3.put_object(Bucket="my-own-bucket", Key="notes.md", Body=b"# mine")
    item = {"job_id": {"S": "j1"}, "dataset": {"S": "0001"}, "blob": {"B": b"\x00\x01"}, "n": {"N": "3"}}
    _client(cloud, "dynamodb").put_item(TableName=cloud.endpoints["jobs_table"], Item=item)
    queue = sqs.create_queue(QueueName="my-notifications", Attributes={"VisibilityTimeout": "7"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"status": ["FAILED"]})
    topic = cloud.endpoints["notification_topic_arn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"FilterPolicy": policy})
    own_topic = sns.create_topic(Name="my-topic", Attributes={"DisplayName": "mine"})["TopicArn"]
    sns.subscribe(TopicArn=own_topic, Protocol="sqs", Endpoint=arn)
    return {"item": item, "queue_arn": arn, "policy": policy, "own_topic": own_topic}


def _subscriptions(cloud: LocalCloud, topic: str) -> dict[str, str]:
    """Endpoint → FilterPolicy of the topic's subscriptions."""
    sns = _client(cloud, "sns")
    found = {}
    for item in sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]:
        attributes = sns.get_subscription_attributes(SubscriptionArn=item["SubscriptionArn"])["Attributes"]
        found[item["Endpoint"]] = attributes.get("FilterPolicy", "")
    return found


def _api_status(cloud: LocalCloud, api_key: str) -> int:
    request = urllib.request.Request(
        cloud.endpoints["api_url"] + "/jobs?dataset=x", headers={"x-api-key": api_key}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state"


def test_given_user_state_when_cloud_restarts_then_objects_items_subscription_key_and_ports_are_kept(
    state: Path, tmp_path: Path
):
    with _cloud(state) as first:
        added = _user_state(first, tmp_path)
        before = _objects(_client(first, "s3"), first.endpoints["artifacts_bucket"])
        endpoints = dict(first.endpoints)
    assert not (state / "endpoints.json").exists()  # nothing answers there once stopped

    with _cloud(state) as second:
        s3, sqs = _client(second, "s3"), _client(second, "sqs")
        after = _objects(s3, second.endpoints["artifacts_bucket"])
        own = _objects(s3, "my-own-bucket")
        item = _client(second, "dynamodb").get_item(
            TableName=second.endpoints["jobs_table"], Key={"job_id": {"S": "j1"}}
        )["Item"]
        subscriptions = _subscriptions(second, second.endpoints["notification_topic_arn"])
        own_topic = _client(second, "sns").get_topic_attributes(TopicArn=added["own_topic"])["Attributes"]
        own_subscriptions = _subscriptions(second, added["own_topic"])
        queue = sqs.get_queue_url(QueueName="my-notifications")["QueueUrl"]
        timeout = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["VisibilityTimeout"])["Attributes"]
        _client(second, "sns").publish(
            TopicArn=second.endpoints["notification_topic_arn"],
            Message="job j1 failed",
            MessageAttributes={"status": {"DataType": "String", "StringValue": "FAILED"}},
        )
        delivered = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=5).get("Messages", [])
        api_status = _api_status(second, endpoints["api_key"])
        restarted = dict(second.endpoints)

    assert after == before  # ETags too: the part-uploaded object's `-2` ETag comes back
    assert before["checkpoints/t/state.bin"][0].endswith('-2"')
    assert own["notes.md"][3] == b"# mine"
    assert item == added["item"]
    assert subscriptions[added["queue_arn"]] == added["policy"]
    assert (own_topic["DisplayName"], list(own_subscriptions)) == ("mine", [added["queue_arn"]])
    assert timeout == {"VisibilityTimeout": "7"}
    assert [json.loads(message["Body"])["Message"] for message in delivered] == ["job j1 failed"]
    assert restarted["api_key"] == endpoints["api_key"] and api_status != 403
    assert (restarted["aws_endpoint_url"], restarted["api_url"]) == (
        endpoints["aws_endpoint_url"],
        endpoints["api_url"],
    )


def test_given_saved_state_when_started_fresh_then_it_starts_empty(state: Path, tmp_path: Path):
    with _cloud(state) as first:
        added = _user_state(first, tmp_path)
        old_key = first.endpoints["api_key"]

    with _cloud(state, fresh=True) as fresh:
        s3 = _client(fresh, "s3")
        objects = _objects(s3, fresh.endpoints["artifacts_bucket"])
        buckets = {item["Name"] for item in s3.list_buckets()["Buckets"]}
        items = _client(fresh, "dynamodb").scan(TableName=fresh.endpoints["jobs_table"])["Items"]
        subscriptions = _subscriptions(fresh, fresh.endpoints["notification_topic_arn"])
        restored, new_key = fresh.restored.restored, fresh.endpoints["api_key"]

    assert (objects, items, restored) == ({}, [], False)
    assert "my-own-bucket" not in buckets
    assert added["queue_arn"] not in subscriptions
    assert new_key != old_key


def test_given_saved_ports_taken_when_cloud_restarts_then_it_starts_on_other_ports(state: Path):
    with _cloud(state) as first:
        endpoints = dict(first.endpoints)
    port = int(endpoints["aws_endpoint_url"].rsplit(":", 1)[1])

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with _cloud(state) as second:
            moved = second.endpoints["aws_endpoint_url"]
            buckets = {item["Name"] for item in _client(second, "s3").list_buckets()["Buckets"]}

    assert moved != endpoints["aws_endpoint_url"]
    assert endpoints["dataset_bucket"] in buckets


def test_given_dataset_uploaded_just_before_stop_when_restarted_then_it_is_ingested_and_logged(state: Path):
    # Given an upload whose events still wait out the queue's delay (SettleSeconds) when the cloud stops
    with _cloud(state, parameters={"SettleSeconds": "2"}) as first:
        bucket = first.endpoints["dataset_bucket"]
        _client(first, "s3").put_object(
            Bucket=bucket, Key="0009-late/config.toml", Body=b"max_train_steps = 1\n"
        )
        jobs_at_stop = _client(first, "dynamodb").scan(TableName=first.endpoints["jobs_table"])["Items"]

    # When the cloud starts again on the same state
    with _cloud(state, parameters={"SettleSeconds": "2"}) as second:
        table, dynamodb = second.endpoints["jobs_table"], _client(second, "dynamodb")
        deadline = time.monotonic() + 30
        while not (jobs := dynamodb.scan(TableName=table)["Items"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        logs = _client(second, "logs")
        function = _upload_queue_function(second)
        time.sleep(1.5)  # the log shipper sends every half second
        events = logs.filter_log_events(logGroupName=f"/aws/lambda/{function}")["events"]
        messages = [event["message"] for event in events]
        on_disk = (state / "logs" / "lambda" / f"{function}.log").read_text()

    # Then the reconcile step re-sent the dataset's upload event, and the ingest function handled it
    assert jobs_at_stop == []
    assert [job["dataset"]["S"] for job in jobs] == ["0009-late"]
    assert any('"dataset ingested"' in message and "0009-late" in message for message in messages)
    assert "0009-late" in on_disk


def _upload_queue_function(cloud: LocalCloud) -> str:
    """The function reading the queue the dataset bucket's upload events go to (as the template wires it)."""
    assert cloud.context is not None
    s3 = _client(cloud, "s3")
    configuration = s3.get_bucket_notification_configuration(Bucket=cloud.endpoints["dataset_bucket"])
    (queue,) = {item["QueueArn"] for item in configuration["QueueConfigurations"]}
    (function,) = [m.function_name for m in cloud.context.sqs_mappings if m.queue_arn == queue]
    return function


def test_given_training_interrupted_by_stop_when_restarted_then_its_checkpoint_is_in_s3(state: Path):
    with _cloud(state, training_command=FAKE_TRAINER) as first:
        artifacts = first.endpoints["artifacts_bucket"]
        s3 = _client(first, "s3")
        s3.put_object(Bucket=artifacts, Key="data/0001/a.png", Body=b"png")
        _client(first, "sagemaker").create_training_job(
            TrainingJobName="loraflow-j9",
            AlgorithmSpecification={"TrainingImage": "x", "TrainingInputMode": "File"},
            RoleArn="arn:aws:iam::123456789012:role/sm",
            HyperParameters={"mode": "checkpoint_on_sigterm"},
            InputDataConfig=[
                {
                    "ChannelName": "dataset",
                    "DataSource": {
                        "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{artifacts}/data/0001/"}
                    },
                }
            ],
            OutputDataConfig={"S3OutputPath": f"s3://{artifacts}/training"},
            ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
            StoppingCondition={"MaxRuntimeInSeconds": 600},
            CheckpointConfig={"S3Uri": f"s3://{artifacts}/checkpoints/loraflow-j9/"},
        )
        log = state / "sagemaker" / "training" / "loraflow-j9" / "training.log"
        deadline = time.monotonic() + 30
        while "training until SIGTERM" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, "the training job never started"
            time.sleep(0.2)

    with _cloud(state) as second:
        checkpoint = (
            _client(second, "s3")
            .get_object(
                Bucket=second.endpoints["artifacts_bucket"],
                Key="checkpoints/loraflow-j9/state/step-7/lora.pt",
            )["Body"]
            .read()
        )

    assert checkpoint == b"weights at step 7"


# The S3 seam alone, on the moto server of the other seam tests (no cloud) -------------------------------


def test_given_saved_objects_when_saved_again_then_unchanged_content_is_not_fetched_again(
    aws_env: str, tmp_path: Path
):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="kept")
    for key in ("a.txt", "b.txt"):
        s3.put_object(Bucket="kept", Key=key, Body=key.encode())
    snapshot = S3Snapshot(s3, tmp_path / "blobs", "us-east-1")
    first = snapshot.save(None)
    inodes = {path.name: path.stat().st_ino for path in (tmp_path / "blobs").iterdir()}

    s3.put_object(Bucket="kept", Key="b.txt", Body=b"changed")
    second = snapshot.save(first)
    snapshot.committed(second)

    blobs = {path.name: path.stat().st_ino for path in (tmp_path / "blobs").iterdir()}
    a_blob = second["buckets"]["kept"][0]["blob"]
    assert first["buckets"]["kept"][0] == second["buckets"]["kept"][0]
    assert blobs[a_blob] == inodes[a_blob]  # the same file: a.txt was not downloaded again
    assert len(blobs) == 2  # b.txt's old content was dropped, its new content kept
    assert (tmp_path / "blobs" / second["buckets"]["kept"][1]["blob"]).read_bytes() == b"changed"


def test_given_bucket_notifying_a_queue_when_objects_restored_then_no_upload_events_are_sent(
    aws_env: str, tmp_path: Path
):
    s3, sqs = boto3.client("s3", region_name="us-east-1"), boto3.client("sqs", region_name="us-east-1")
    s3.create_bucket(Bucket="source")
    s3.put_object(Bucket="source", Key="0001/a.png", Body=b"png")
    saved = S3Snapshot(s3, tmp_path / "blobs", "us-east-1").save(None)
    boto3.client("s3", region_name="us-east-1").delete_object(Bucket="source", Key="0001/a.png")
    queue = sqs.create_queue(QueueName="uploads")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    notifications = {"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]}
    s3.put_bucket_notification_configuration(Bucket="source", NotificationConfiguration=notifications)

    counts = S3Snapshot(s3, tmp_path / "blobs", "us-east-1").restore(saved)

    bodies = [
        m["Body"] for m in sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
    ]
    assert counts == {"objects": 1, "objects_with_new_etag": 0}
    assert not [body for body in bodies if "ObjectCreated" in body]
    after = s3.get_bucket_notification_configuration(Bucket="source")["QueueConfigurations"]
    assert [(item["QueueArn"], item["Events"]) for item in after] == [(arn, ["s3:ObjectCreated:*"])]
