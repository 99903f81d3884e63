"""Provisioning of code-running resources: Lambda, Step Functions, SageMaker, API Gateway."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraflow_local.intrinsics import Deployed, TemplateError, as_text
from loraflow_local.lambda_runtime import FunctionSpec
from loraflow_local.provision_context import ProvisionContext, RestApiRecord, SqsMapping

LOG = logging.getLogger(__name__)


def create_layer(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    content = props["Content"]
    folder = ctx.stack.local_path(content["S3Bucket"], content["S3Key"])
    name = props.get("LayerName") or logical_id
    arn = ctx.arn("lambda", f"layer:{name}:1")
    # A built python layer puts packages under python/; a source folder is importable as it is.
    ctx.layers[arn] = folder / "python" if (folder / "python").is_dir() else folder
    return Deployed(ref=arn, attributes={"LayerVersionArn": arn})


def create_function(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    code = props.get("Code") or {}
    if "S3Bucket" not in code:
        raise TemplateError(f"{logical_id}: only CodeUri folders run locally (not ZipFile or ImageUri)")
    code_paths = [ctx.stack.local_path(code["S3Bucket"], code["S3Key"])]
    for layer in props.get("Layers", []):
        if layer not in ctx.layers:
            raise TemplateError(f"{logical_id}: layer {layer} is not defined in the template")
        code_paths.append(ctx.layers[layer])
    name = props.get("FunctionName") or ctx.physical_name(logical_id, 64)
    variables = (props.get("Environment") or {}).get("Variables", {})
    environment = {key: as_text(value) for key, value in variables.items()}
    created = ctx.client("lambda").create_function(
        FunctionName=name,
        Runtime=props.get("Runtime", "python3.12"),
        Role=props["Role"],
        Handler=props["Handler"],
        Code={"ZipFile": _placeholder_zip(code_paths[0])},
        Timeout=int(props.get("Timeout", 3)),
        MemorySize=int(props.get("MemorySize", 128)),
        Environment={"Variables": environment},
        Description=props.get("Description", ""),
    )
    ctx.services.lambdas.register(
        FunctionSpec(
            name=name,
            arn=created["FunctionArn"],
            handler=props["Handler"],
            code_paths=tuple(code_paths),
            environment=environment,
            timeout_s=int(props.get("Timeout", 3)),
            memory_mb=int(props.get("MemorySize", 128)),
            region=ctx.region,
        )
    )
    return Deployed(ref=name, attributes={"Arn": created["FunctionArn"]})


def _placeholder_zip(code_dir: Path) -> bytes:
    """moto wants a zip; the code itself runs in-process from the CodeUri folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("LOCAL.txt", f"runs in-process from {code_dir}\n")
    return buffer.getvalue()


def record_event_source_mapping(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    """Recorded for the local poller, not created in moto (moto would invoke at once, ignoring delays)."""
    source = props["EventSourceArn"]
    if not source.startswith("arn:aws:sqs:"):
        raise TemplateError(f"{logical_id}: only SQS event sources run locally, not {source}")
    if props.get("Enabled", True) is False:
        return Deployed(ref=str(uuid.uuid4()))
    function = props["FunctionName"].split(":function:")[-1].split(":")[0]
    ctx.sqs_mappings.append(
        SqsMapping(
            function_name=function,
            queue_arn=source,
            queue_url=ctx.queue_urls[source],
            batch_size=int(props.get("BatchSize", 10)),
            report_batch_item_failures="ReportBatchItemFailures" in props.get("FunctionResponseTypes", []),
        )
    )
    return Deployed(ref=str(uuid.uuid4()))


def create_state_machine(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    if "DefinitionS3Location" in props:
        location = props["DefinitionS3Location"]
        definition = ctx.stack.local_path(location["Bucket"], location["Key"]).read_text(encoding="utf-8")
    elif "Definition" in props:
        definition = json.dumps(props["Definition"])
    else:
        definition = props["DefinitionString"]
    for key, value in (props.get("DefinitionSubstitutions") or {}).items():
        definition = definition.replace("${" + key + "}", as_text(value))
    leftover = sorted(set(re.findall(r"\$\{(\w+)\}", definition)))
    if leftover:
        LOG.warning("%s: the definition still has ${...} placeholders: %s", logical_id, ", ".join(leftover))
    name = props.get("StateMachineName") or ctx.physical_name(logical_id, 80)
    created = ctx.client("stepfunctions").create_state_machine(
        name=name,
        definition=definition,
        roleArn=props["RoleArn"],
        type=props.get("StateMachineType", "STANDARD"),
    )
    arn = created["stateMachineArn"]
    revision = created.get("stateMachineVersionArn", arn)
    return Deployed(ref=arn, attributes={"Arn": arn, "Name": name, "StateMachineRevisionId": revision})


def create_model(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    request = {key: value for key, value in props.items() if key != "ModelName"}
    name = props.get("ModelName") or ctx.physical_name(logical_id, 63)
    arn = ctx.client("sagemaker").create_model(ModelName=name, **request)["ModelArn"]
    return Deployed(ref=arn, attributes={"ModelName": name})


def create_endpoint_config(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    request = {key: value for key, value in props.items() if key != "EndpointConfigName"}
    name = props.get("EndpointConfigName") or ctx.physical_name(logical_id, 63)
    created = ctx.client("sagemaker").create_endpoint_config(EndpointConfigName=name, **request)
    arn = created["EndpointConfigArn"]
    return Deployed(ref=arn, attributes={"EndpointConfigName": name})


def create_endpoint(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    name = props.get("EndpointName") or ctx.physical_name(logical_id, 63)
    arn = ctx.client("sagemaker").create_endpoint(
        EndpointName=name, EndpointConfigName=props["EndpointConfigName"], Tags=props.get("Tags", [])
    )["EndpointArn"]
    return Deployed(ref=arn, attributes={"EndpointName": name})


def create_rest_api(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    if "Body" not in props:
        raise TemplateError(f"{logical_id}: only REST APIs defined by a swagger Body run locally")
    body = props["Body"]
    name = props.get("Name") or (body.get("info") or {}).get("title") or ctx.physical_name(logical_id)
    apigateway = ctx.client("apigateway")
    api_id = apigateway.create_rest_api(name=name)["id"]
    resources = apigateway.get_resources(restApiId=api_id)["items"]
    root = next(item["id"] for item in resources if item["path"] == "/")
    ctx.rest_apis[api_id] = RestApiRecord(api_id=api_id, name=name, body=body)
    return Deployed(ref=api_id, attributes={"RootResourceId": root})


def record_stage(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    record = ctx.rest_apis[props["RestApiId"]]
    if record.stage is not None and record.stage != props["StageName"]:
        raise TemplateError(f"{logical_id}: the local router serves one stage per API (has {record.stage})")
    record.stage = props["StageName"]
    return Deployed(ref=props["StageName"])


def record_deployment(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    return Deployed(ref=secrets.token_hex(5))  # the router always serves the template's current swagger


def create_api_key(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    value = props.get("Value") or ctx.api_key_values.get(logical_id) or secrets.token_urlsafe(30)
    ctx.api_key_values[logical_id] = value
    key = ctx.client("apigateway").create_api_key(
        name=props.get("Name") or ctx.physical_name(logical_id, 128),
        enabled=bool(props.get("Enabled", False)),
        value=value,
    )
    if key["enabled"]:
        ctx.api_keys[key["id"]] = value
    for stage_key in props.get("StageKeys", []):  # legacy association, still honoured by API Gateway
        ctx.rest_apis[stage_key["RestApiId"]].key_ids.add(key["id"])
    return Deployed(ref=key["id"], attributes={"APIKeyId": key["id"]})


def create_usage_plan(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    stages = [{"apiId": item["ApiId"], "stage": item["Stage"]} for item in props.get("ApiStages", [])]
    plan = ctx.client("apigateway").create_usage_plan(
        name=props.get("UsagePlanName") or ctx.physical_name(logical_id, 128), apiStages=stages
    )
    ctx.usage_plans[plan["id"]] = {stage["apiId"] for stage in stages}
    return Deployed(ref=plan["id"], attributes={"Id": plan["id"]})


def create_usage_plan_key(ctx: ProvisionContext, logical_id: str, props: Mapping[str, Any]) -> Deployed:
    ctx.client("apigateway").create_usage_plan_key(
        usagePlanId=props["UsagePlanId"], keyId=props["KeyId"], keyType=props.get("KeyType", "API_KEY")
    )
    for api_id in ctx.usage_plans.get(props["UsagePlanId"], set()):
        ctx.rest_apis[api_id].key_ids.add(props["KeyId"])
    return Deployed(ref=f"{props['KeyId']}:{props['UsagePlanId']}")
