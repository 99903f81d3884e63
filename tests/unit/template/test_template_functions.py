"""Lambda functions: code locations, environment contract (docs/architecture.md), triggers and the API."""

from __future__ import annotations

from typing import Any

import pytest
from loraflow_api.settings import ApiSettings
from loraflow_callback.settings import CallbackSettings
from loraflow_ingest.settings import IngestSettings
from loraflow_pipeline.settings import PipelineSettings
from loraflow_shared.settings import EnvSettings
from template_helpers import REPO_ROOT, resources_of_type

# The environment contract: the variables each function's settings model reads (derived, never listed twice).
SETTINGS_BY_FUNCTION: dict[str, type[EnvSettings]] = {
    "IngestDatasetFunction": IngestSettings,
    "PipelineTasksFunction": PipelineSettings,
    "PreviewCallbackFunction": CallbackSettings,
    "JobsApiFunction": ApiSettings,
}
EXPECTED_ENVIRONMENT = {
    function_id: {name.upper() for name in settings.model_fields}
    for function_id, settings in SETTINGS_BY_FUNCTION.items()
}

# A variable means the same resource in every function that reads it.
SHARED_VARIABLE_VALUES = {
    "JOBS_TABLE": {"Ref": "JobsTable"},
    "NOTIFICATION_TOPIC_ARN": {"Ref": "NotificationTopic"},
    "ARTIFACTS_BUCKET": {"Ref": "ArtifactsBucket"},
    "STATE_MACHINE_ARN": {"Ref": "TrainingPipeline"},
    "PREVIEW_ENDPOINT_NAME": {"Fn::GetAtt": ["PreviewEndpoint", "EndpointName"]},
    "LARGE_MODEL_PREVIEW_ENDPOINT_NAME": {
        "Fn::If": ["HasLargeModels", {"Fn::GetAtt": ["LargeModelPreviewEndpoint", "EndpointName"]}, ""]
    },
}

FUNCTION_IDS = sorted(EXPECTED_ENVIRONMENT)


def _variables(template: dict[str, Any], function_id: str) -> dict[str, Any]:
    variables: dict[str, Any] = template["Resources"][function_id]["Properties"]["Environment"]["Variables"]
    return variables


def test_given_template_when_functions_listed_then_exactly_the_four_contract_functions(
    transformed: dict[str, Any],
) -> None:
    assert sorted(resources_of_type(transformed, "AWS::Lambda::Function")) == FUNCTION_IDS


@pytest.mark.parametrize("function_id", FUNCTION_IDS)
def test_given_function_when_handler_resolved_under_code_uri_then_module_file_exists(
    template: dict[str, Any], function_id: str
) -> None:
    properties = template["Resources"][function_id]["Properties"]
    module_path, _, attribute = properties["Handler"].rpartition(".")

    module_file = REPO_ROOT / properties["CodeUri"] / (module_path.replace(".", "/") + ".py")

    assert attribute == "lambda_handler"
    assert module_file.is_file(), f"{function_id}: {module_file.relative_to(REPO_ROOT)} is missing"


@pytest.mark.parametrize("function_id", FUNCTION_IDS)
def test_given_function_when_environment_read_then_names_are_the_contract_plus_powertools(
    transformed: dict[str, Any], function_id: str
) -> None:
    names = set(_variables(transformed, function_id))

    assert names - {"POWERTOOLS_SERVICE_NAME", "POWERTOOLS_LOG_LEVEL"} == EXPECTED_ENVIRONMENT[function_id]
    assert {"POWERTOOLS_SERVICE_NAME", "POWERTOOLS_LOG_LEVEL"} <= names


def test_given_functions_when_shared_variables_compared_then_each_names_one_resource(
    transformed: dict[str, Any],
) -> None:
    seen = {
        (name, str(value))
        for function_id in FUNCTION_IDS
        for name, value in _variables(transformed, function_id).items()
        if name in SHARED_VARIABLE_VALUES
    }

    assert seen == {(name, str(value)) for name, value in SHARED_VARIABLE_VALUES.items()}


def test_given_functions_when_service_names_compared_then_each_is_distinct(
    transformed: dict[str, Any],
) -> None:
    service_names = [_variables(transformed, f)["POWERTOOLS_SERVICE_NAME"] for f in FUNCTION_IDS]

    assert len(set(service_names)) == len(FUNCTION_IDS)


@pytest.mark.parametrize("function_id", FUNCTION_IDS)
def test_given_function_when_runtime_inspected_then_python312_with_shared_layer_and_tracing(
    transformed: dict[str, Any], function_id: str
) -> None:
    properties = transformed["Resources"][function_id]["Properties"]
    (layer,) = properties["Layers"]
    layer_resource = transformed["Resources"][layer["Ref"]]

    assert properties["Runtime"] == "python3.12"
    assert properties["Architectures"] == ["x86_64"]
    assert properties["TracingConfig"] == {"Mode": "Active"}
    assert layer_resource["Type"] == "AWS::Lambda::LayerVersion"
    assert "python3.12" in layer_resource["Properties"]["CompatibleRuntimes"]


def test_given_shared_layer_when_built_then_sam_installs_its_requirements(template: dict[str, Any]) -> None:
    layer = template["Resources"]["SharedLayer"]

    assert layer["Properties"]["ContentUri"] == "layers/shared/"
    assert layer["Metadata"] == {"BuildMethod": "python3.12"}


def test_given_ingest_function_when_triggered_then_by_upload_queue_with_partial_batch_failures(
    transformed: dict[str, Any],
) -> None:
    mappings = [
        m["Properties"]
        for m in resources_of_type(transformed, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": "IngestDatasetFunction"}
    ]

    assert mappings == [
        {
            "BatchSize": 10,
            "EventSourceArn": {"Fn::GetAtt": ["UploadEventsQueue", "Arn"]},
            "FunctionName": {"Ref": "IngestDatasetFunction"},
            "FunctionResponseTypes": ["ReportBatchItemFailures"],
        }
    ]


def test_given_preview_callback_when_subscribed_then_to_both_endpoint_topics(
    transformed: dict[str, Any],
) -> None:
    topics = sorted(
        s["Properties"]["TopicArn"]["Ref"]
        for s in resources_of_type(transformed, "AWS::SNS::Subscription").values()
        if s["Properties"]["Endpoint"] == {"Fn::GetAtt": ["PreviewCallbackFunction", "Arn"]}
    )

    assert topics == ["PreviewErrorTopic", "PreviewSuccessTopic"]


def test_given_jobs_api_when_routes_listed_then_all_but_the_gallery_page_behind_an_api_key(
    transformed: dict[str, Any],
) -> None:
    swagger = transformed["Resources"]["JobsApi"]["Properties"]["Body"]
    routes = {
        (path, method): operation
        for path, operations in swagger["paths"].items()
        for method, operation in operations.items()
    }

    assert sorted(routes) == [
        ("/", "get"),  # the gallery page: it asks the user for the key, then calls the routes below
        ("/jobs", "get"),
        ("/jobs/{job_id}", "get"),
        ("/jobs/{job_id}/cancel", "post"),
        ("/jobs/{job_id}/generations", "post"),
        ("/jobs/{job_id}/generations/{generation_id}", "get"),
        ("/jobs/{job_id}/retry", "post"),
    ]
    for route, operation in routes.items():
        assert operation["security"] == ([] if route == ("/", "get") else [{"api_key": []}])
        assert operation["x-amazon-apigateway-integration"]["type"] == "aws_proxy"
        assert "${JobsApiFunction.Arn}" in operation["x-amazon-apigateway-integration"]["uri"]["Fn::Sub"]


def test_given_jobs_api_when_deployed_then_stage_v1_with_usage_plan_and_key(
    transformed: dict[str, Any],
) -> None:
    stage = transformed["Resources"]["JobsApiv1Stage"]["Properties"]
    usage_plan = transformed["Resources"]["JobsApiUsagePlan"]["Properties"]

    assert stage["StageName"] == "v1"
    assert usage_plan["ApiStages"] == [{"ApiId": {"Ref": "JobsApi"}, "Stage": {"Ref": "JobsApiv1Stage"}}]
    assert transformed["Resources"]["JobsApiApiKey"]["Type"] == "AWS::ApiGateway::ApiKey"
