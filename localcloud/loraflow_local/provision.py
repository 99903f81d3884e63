"""Create every resource of the transformed template in moto, in dependency order.

One small handler per resource type. Types the local cloud deliberately does not create are listed in
`SKIPPED_TYPES` with the reason; any other type is an error naming it, so the template and the local
cloud cannot drift apart silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from loraflow_local import provision_compute as compute
from loraflow_local import provision_data as data
from loraflow_local.intrinsics import Deployed, TemplateError
from loraflow_local.provision_context import ProvisionContext

LOG = logging.getLogger(__name__)

Handler = Callable[[ProvisionContext, str, Mapping[str, Any]], Deployed]

HANDLERS: dict[str, Handler] = {
    "AWS::S3::Bucket": data.create_bucket,
    "AWS::SQS::Queue": data.create_queue,
    "AWS::SNS::Topic": data.create_topic,
    "AWS::SNS::Subscription": data.create_subscription,
    "AWS::DynamoDB::Table": data.create_table,
    "AWS::IAM::Role": data.create_role,
    "AWS::Logs::LogGroup": data.create_log_group,
    "AWS::Lambda::LayerVersion": compute.create_layer,
    "AWS::Lambda::Function": compute.create_function,
    "AWS::Lambda::EventSourceMapping": compute.record_event_source_mapping,
    "AWS::StepFunctions::StateMachine": compute.create_state_machine,
    "AWS::SageMaker::Model": compute.create_model,
    "AWS::SageMaker::EndpointConfig": compute.create_endpoint_config,
    "AWS::SageMaker::Endpoint": compute.create_endpoint,
    "AWS::ApiGateway::RestApi": compute.create_rest_api,
    "AWS::ApiGateway::Deployment": compute.record_deployment,
    "AWS::ApiGateway::Stage": compute.record_stage,
    "AWS::ApiGateway::ApiKey": compute.create_api_key,
    "AWS::ApiGateway::UsagePlan": compute.create_usage_plan,
    "AWS::ApiGateway::UsagePlanKey": compute.create_usage_plan_key,
}

SKIPPED_TYPES: dict[str, str] = {
    "AWS::S3::BucketPolicy": "moto does not enforce bucket policies",
    "AWS::SQS::QueuePolicy": "moto does not enforce queue policies",
    "AWS::SNS::TopicPolicy": "moto does not enforce topic policies",
    "AWS::IAM::Policy": "moto does not enforce IAM",
    "AWS::IAM::ManagedPolicy": "moto does not enforce IAM",
    "AWS::Lambda::Permission": "moto does not enforce resource policies; invocations are in-process",
    "AWS::Lambda::EventInvokeConfig": (
        "local asynchronous invocations (SNS) run once, in-process: no retries, no OnFailure destination"
    ),
    "AWS::CloudWatch::Alarm": "no metrics are emitted locally",
    "AWS::ApiGateway::Account": "API Gateway's account-wide logging role; the local router logs no access",
    "AWS::ApplicationAutoScaling::ScalableTarget": "the local endpoint is one process, started on demand",
    "AWS::ApplicationAutoScaling::ScalingPolicy": "the local endpoint is one process, started on demand",
}


def check_supported(resources: Mapping[str, Mapping[str, Any]]) -> None:
    """Fail before creating anything if a resource type is neither handled nor knowingly skipped."""
    unknown = sorted(
        f"{logical_id} ({resource['Type']})"
        for logical_id, resource in resources.items()
        if resource["Type"] not in HANDLERS and resource["Type"] not in SKIPPED_TYPES
    )
    if unknown:
        raise TemplateError(
            "the local cloud cannot create: "
            + ", ".join(unknown)
            + "; add a handler in loraflow_local.provision (or a reason in SKIPPED_TYPES)"
        )


def provision(ctx: ProvisionContext, deployed: dict[str, Deployed]) -> None:
    """Create the stack's resources; `deployed` (the resolver's view) fills up as they are created."""
    check_supported(ctx.stack.resources)
    for logical_id in ctx.stack.creation_order():
        resource = ctx.stack.resources[logical_id]
        kind = resource["Type"]
        if kind in SKIPPED_TYPES:
            ctx.skipped[logical_id] = kind
            LOG.debug("skipping %s (%s): %s", logical_id, kind, SKIPPED_TYPES[kind])
            deployed[logical_id] = Deployed(ref=ctx.physical_name(logical_id), attributes={})
            continue
        properties = ctx.resolver.resolve(resource.get("Properties", {}))
        try:
            deployed[logical_id] = HANDLERS[kind](ctx, logical_id, properties)
        except TemplateError:
            raise
        except Exception as error:
            raise TemplateError(f"creating {logical_id} ({kind}) failed: {error}") from error
        LOG.debug("created %s (%s): %s", logical_id, kind, deployed[logical_id].ref)
