"""Provisioning of storage and messaging resources: S3, SQS, SNS, DynamoDB, IAM roles, log groups."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from loraflow_local.cloud_logs import create_ignoring_existing
from loraflow_local.intrinsics import Deployed, TemplateError
from loraflow_local.provision_context import ProvisionContext, bucket_name

LOG = logging.getLogger(__name__)


def create_bucket(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    s3 = ctx.client("s3")
    name = props.get("BucketName") or bucket_name(ctx.stack_name, logical_id)
    if ctx.region == "us-east-1":
        s3.create_bucket(Bucket=name)
    else:
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": ctx.region})
    if "BucketEncryption" in props:
        rules = [  # CloudFormation's ServerSideEncryptionByDefault is the API's Apply... key
            {
                ("Apply" + key if key == "ServerSideEncryptionByDefault" else key): value
                for key, value in rule.items()
            }
            for rule in props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        ]
        s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
    if "VersioningConfiguration" in props:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration=props["VersioningConfiguration"])
    if "NotificationConfiguration" in props:
        configuration = bucket_notifications(props["NotificationConfiguration"])
        s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration=configuration)
    return Deployed(
        ref=name,
        attributes={
            "Arn": f"arn:aws:s3:::{name}",
            "DomainName": f"{name}.s3.amazonaws.com",
            "RegionalDomainName": f"{name}.s3.{ctx.region}.amazonaws.com",
            "WebsiteURL": f"http://{name}.s3-website-{ctx.region}.amazonaws.com",
        },
    )


def bucket_notifications(cfn: Mapping[str, Any]) -> dict[str, Any]:
    """CloudFormation's NotificationConfiguration in the PutBucketNotificationConfiguration API's terms."""
    targets = {
        "QueueConfigurations": ("Queue", "QueueArn"),
        "TopicConfigurations": ("Topic", "TopicArn"),
        "LambdaConfigurations": ("Function", "LambdaFunctionArn"),
    }
    api: dict[str, Any] = {}
    for section, (cfn_key, api_key) in targets.items():
        for entry in cfn.get(section, []):
            item: dict[str, Any] = {api_key: entry[cfn_key], "Events": [entry["Event"]]}
            rules = ((entry.get("Filter") or {}).get("S3Key") or {}).get("Rules")
            if rules:
                item["Filter"] = {"Key": {"FilterRules": rules}}
            api.setdefault(section, []).append(item)
    if cfn.get("EventBridgeConfiguration", {}).get("EventBridgeEnabled"):
        api["EventBridgeConfiguration"] = {}
    return api


_QUEUE_ATTRIBUTES = (
    "DelaySeconds",
    "VisibilityTimeout",
    "MessageRetentionPeriod",
    "MaximumMessageSize",
    "ReceiveMessageWaitTimeSeconds",
    "FifoQueue",
    "ContentBasedDeduplication",
    "SqsManagedSseEnabled",
    "KmsMasterKeyId",
)


def create_queue(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    sqs = ctx.client("sqs")
    fifo = bool(props.get("FifoQueue"))
    suffix = ".fifo" if fifo else ""
    name = props.get("QueueName") or ctx.physical_name(logical_id, 80 - len(suffix)) + suffix
    attributes = {key: _attribute_text(props[key]) for key in _QUEUE_ATTRIBUTES if key in props}
    for key in ("RedrivePolicy", "RedriveAllowPolicy"):
        if key in props:
            attributes[key] = json.dumps(props[key]) if not isinstance(props[key], str) else props[key]
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    ctx.queue_urls[arn] = url
    return Deployed(ref=url, attributes={"Arn": arn, "QueueName": name, "QueueUrl": url})


def create_topic(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    sns = ctx.client("sns")
    fifo = bool(props.get("FifoTopic"))
    suffix = ".fifo" if fifo else ""
    name = props.get("TopicName") or ctx.physical_name(logical_id, 256 - len(suffix)) + suffix
    attributes = {key: _attribute_text(props[key]) for key in ("FifoTopic", "DisplayName") if key in props}
    arn = sns.create_topic(Name=name, Attributes=attributes)["TopicArn"]
    for subscription in props.get("Subscription", []):
        sns.subscribe(TopicArn=arn, Protocol=subscription["Protocol"], Endpoint=subscription["Endpoint"])
    return Deployed(ref=arn, attributes={"TopicArn": arn, "TopicName": name})


def create_subscription(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    attributes = {
        key: json.dumps(props[key]) if isinstance(props[key], dict) else _attribute_text(props[key])
        for key in ("FilterPolicy", "FilterPolicyScope", "RawMessageDelivery", "RedrivePolicy")
        if key in props
    }
    response = ctx.client("sns").subscribe(
        TopicArn=props["TopicArn"],
        Protocol=props["Protocol"],
        Endpoint=props["Endpoint"],
        Attributes=attributes,
        ReturnSubscriptionArn=True,
    )
    return Deployed(ref=response["SubscriptionArn"], attributes={"Arn": response["SubscriptionArn"]})


# CloudFormation-only table properties, applied with other calls or irrelevant locally.
_TABLE_ONLY_CFN = {
    "PointInTimeRecoverySpecification",
    "TimeToLiveSpecification",
    "ContributorInsightsSpecification",
    "KinesisStreamSpecification",
    "ImportSourceSpecification",
    "ResourcePolicy",
    "SSESpecification",
}


def create_table(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    dynamodb = ctx.client("dynamodb")
    request = {key: value for key, value in props.items() if key not in _TABLE_ONLY_CFN}
    request.setdefault("TableName", ctx.physical_name(logical_id, 255))
    if "SSESpecification" in props:
        sse = props["SSESpecification"]
        request["SSESpecification"] = {"Enabled": bool(sse.get("SSEEnabled"))}
    table = dynamodb.create_table(**request)["TableDescription"]
    ttl = props.get("TimeToLiveSpecification")
    if ttl:
        dynamodb.update_time_to_live(TableName=request["TableName"], TimeToLiveSpecification=ttl)
    return Deployed(
        ref=request["TableName"],
        attributes={"Arn": table["TableArn"], "StreamArn": table.get("LatestStreamArn", "")},
    )


def create_role(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    name = props.get("RoleName") or ctx.physical_name(logical_id, 64)
    role = ctx.client("iam").create_role(
        RoleName=name,
        Path=props.get("Path", "/"),
        AssumeRolePolicyDocument=json.dumps(props["AssumeRolePolicyDocument"]),
        Description=props.get("Description", ""),
    )["Role"]
    # Inline and managed policies are not attached: moto does not enforce IAM.
    return Deployed(ref=name, attributes={"Arn": role["Arn"], "RoleId": role["RoleId"]})


def create_log_group(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    name = props.get("LogGroupName") or ctx.physical_name(logical_id, 512)
    # On a restart a function may have logged (and so made its group) before the group's turn comes.
    create_ignoring_existing(ctx.client("logs").create_log_group, logGroupName=name)
    if "RetentionInDays" in props:
        days = int(props["RetentionInDays"])
        ctx.client("logs").put_retention_policy(logGroupName=name, retentionInDays=days)
    return Deployed(ref=name, attributes={"Arn": ctx.arn("logs", f"log-group:{name}:*")})


def _attribute_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        raise TemplateError(f"expected a scalar attribute, got {value!r}")
    return str(value)
