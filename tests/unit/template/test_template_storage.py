"""Buckets, the jobs table and the upload events queue: hardening and the contract in docs/architecture.md."""

from __future__ import annotations

from typing import Any

import pytest
from loraflow_shared.jobs.repository import CREATED_INDEX, DATASET_INDEX, LISTING_ATTRIBUTE
from template_helpers import as_list, resources_of_type

FULL_PUBLIC_ACCESS_BLOCK = {
    "BlockPublicAcls": True,
    "BlockPublicPolicy": True,
    "IgnorePublicAcls": True,
    "RestrictPublicBuckets": True,
}


def _bucket_ids(template: dict[str, Any]) -> list[str]:
    return sorted(resources_of_type(template, "AWS::S3::Bucket"))


def _tls_only_statements(template: dict[str, Any], bucket_id: str) -> list[dict[str, Any]]:
    policies = [
        p["Properties"]["PolicyDocument"]
        for p in resources_of_type(template, "AWS::S3::BucketPolicy").values()
        if p["Properties"]["Bucket"] == {"Ref": bucket_id}
    ]
    return [
        s
        for document in policies
        for s in as_list(document["Statement"])
        if s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
    ]


def test_given_template_when_buckets_listed_then_dataset_and_artifacts_exist(
    transformed: dict[str, Any],
) -> None:
    assert _bucket_ids(transformed) == ["ArtifactsBucket", "DatasetBucket"]


@pytest.mark.parametrize("bucket_id", ["ArtifactsBucket", "DatasetBucket"])
def test_given_bucket_when_inspected_then_encrypted_and_fully_private(
    transformed: dict[str, Any], bucket_id: str
) -> None:
    properties = transformed["Resources"][bucket_id]["Properties"]
    rules = properties["BucketEncryption"]["ServerSideEncryptionConfiguration"]

    assert [r["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms") for r in rules] == [
        True
    ]
    assert properties["PublicAccessBlockConfiguration"] == FULL_PUBLIC_ACCESS_BLOCK


@pytest.mark.parametrize("bucket_id", ["ArtifactsBucket", "DatasetBucket"])
def test_given_bucket_when_policy_inspected_then_plain_http_is_denied_on_bucket_and_objects(
    transformed: dict[str, Any], bucket_id: str
) -> None:
    statements = _tls_only_statements(transformed, bucket_id)

    assert len(statements) == 1
    assert statements[0]["Principal"] == "*"
    assert statements[0]["Action"] == "s3:*"
    assert statements[0]["Resource"] == [
        {"Fn::GetAtt": [bucket_id, "Arn"]},
        {"Fn::Sub": f"${{{bucket_id}.Arn}}/*"},
    ]


def test_given_dataset_bucket_when_objects_created_or_removed_then_events_go_to_upload_queue_after_its_policy(
    transformed: dict[str, Any],
) -> None:
    bucket = transformed["Resources"]["DatasetBucket"]
    queues = bucket["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    upload_queue = {"Fn::GetAtt": ["UploadEventsQueue", "Arn"]}

    # Removals too: deleting the offending file of a rejected dataset validates it again.
    assert queues == [
        {"Event": "s3:ObjectCreated:*", "Queue": upload_queue},
        {"Event": "s3:ObjectRemoved:*", "Queue": upload_queue},
    ]
    # S3 tests delivery when the notification is created: the queue policy must already exist.
    assert "UploadEventsQueuePolicy" in as_list(bucket["DependsOn"])


def test_given_upload_queue_policy_when_inspected_then_only_s3_of_this_account_may_send(
    transformed: dict[str, Any],
) -> None:
    properties = transformed["Resources"]["UploadEventsQueuePolicy"]["Properties"]
    (statement,) = properties["PolicyDocument"]["Statement"]

    assert properties["Queues"] == [{"Ref": "UploadEventsQueue"}]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}


def test_given_artifacts_bucket_when_lifecycle_inspected_then_async_inference_objects_expire(
    transformed: dict[str, Any],
) -> None:
    rules = transformed["Resources"]["ArtifactsBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    expiring = [r for r in rules if r.get("Prefix") == "async-inference/" and r["Status"] == "Enabled"]

    assert len(expiring) == 1
    assert 1 <= expiring[0]["ExpirationInDays"] <= 90


def test_given_jobs_table_when_inspected_then_keys_and_index_match_the_repository_contract(
    transformed: dict[str, Any],
) -> None:
    properties = transformed["Resources"]["JobsTable"]["Properties"]
    indexes = {index["IndexName"]: index for index in properties["GlobalSecondaryIndexes"]}

    assert properties["BillingMode"] == "PAY_PER_REQUEST"
    assert properties["KeySchema"] == [{"AttributeName": "job_id", "KeyType": "HASH"}]
    assert set(indexes) == {DATASET_INDEX, CREATED_INDEX}
    assert indexes[DATASET_INDEX]["KeySchema"] == [
        {"AttributeName": "dataset", "KeyType": "HASH"},
        {"AttributeName": "created_at", "KeyType": "RANGE"},
    ]
    assert indexes[CREATED_INDEX]["KeySchema"] == [
        {"AttributeName": LISTING_ATTRIBUTE, "KeyType": "HASH"},
        {"AttributeName": "created_at", "KeyType": "RANGE"},
    ]
    assert all(index["Projection"] == {"ProjectionType": "ALL"} for index in indexes.values())
    assert {d["AttributeName"]: d["AttributeType"] for d in properties["AttributeDefinitions"]} == {
        "job_id": "S",
        "dataset": "S",
        "created_at": "S",
        LISTING_ATTRIBUTE: "S",
    }
    assert properties["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert properties["SSESpecification"] == {"SSEEnabled": True}


def test_given_upload_queue_when_compared_with_ingest_timeout_then_visibility_is_at_least_six_times(
    transformed: dict[str, Any],
) -> None:
    queue = transformed["Resources"]["UploadEventsQueue"]["Properties"]
    ingest_timeout = transformed["Resources"]["IngestDatasetFunction"]["Properties"]["Timeout"]

    assert queue["VisibilityTimeout"] >= 6 * ingest_timeout


def test_given_upload_queue_when_inspected_then_delayed_by_settle_time_and_redriven_to_dlq(
    transformed: dict[str, Any],
) -> None:
    queue = transformed["Resources"]["UploadEventsQueue"]["Properties"]

    assert queue["DelaySeconds"] == {"Ref": "SettleSeconds"}
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["UploadEventsDeadLetterQueue", "Arn"]},
        "maxReceiveCount": 5,
    }
    assert queue["SqsManagedSseEnabled"] is True


def test_given_settle_seconds_when_bounded_then_within_what_sqs_can_delay(template: dict[str, Any]) -> None:
    settle = template["Parameters"]["SettleSeconds"]

    assert settle["MinValue"] == 0
    assert settle["MaxValue"] <= 900  # SQS DelaySeconds maximum
    assert settle["MinValue"] <= settle["Default"] <= settle["MaxValue"]


@pytest.mark.parametrize("logical_id", ["ArtifactsBucket", "DatasetBucket", "JobsTable"])
def test_given_user_data_resource_when_stack_deleted_or_replaced_then_data_is_retained(
    template: dict[str, Any], logical_id: str
) -> None:
    resource = template["Resources"][logical_id]

    assert (resource["DeletionPolicy"], resource["UpdateReplacePolicy"]) == ("Retain", "Retain")
