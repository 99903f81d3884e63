"""Operations: alarms on the alarm topic, API access logs, log retention, API stages, capacity limits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from loraflow_api.settings import MAX_URL_EXPIRY_SECONDS
from template_helpers import as_list, resources_of_type

ALARM_TOPIC = {"Ref": "AlarmTopic"}


def _alarms_on(template: dict[str, Any], namespace: str, metric: str) -> list[dict[str, Any]]:
    return [
        alarm["Properties"]
        for alarm in resources_of_type(template, "AWS::CloudWatch::Alarm").values()
        if (alarm["Properties"]["Namespace"], alarm["Properties"]["MetricName"]) == (namespace, metric)
    ]


def _dimensions(alarm: dict[str, Any]) -> dict[str, Any]:
    return {dimension["Name"]: dimension["Value"] for dimension in alarm["Dimensions"]}


OPERATIONS_ALARMS = [
    ("AWS/States", "ExecutionsFailed", {"StateMachineArn": "TrainingPipeline"}),
    ("AWS/States", "ExecutionsTimedOut", {"StateMachineArn": "TrainingPipeline"}),
    *(
        ("AWS/SageMaker", metric, {"EndpointName": endpoint, "VariantName": "AllTraffic"})
        for metric in ("InvocationFailures", "NotificationFailures")
        for endpoint in ("PreviewEndpoint", "LargeModelPreviewEndpoint")  # one per compute class
    ),
]


def _watches(alarm: dict[str, Any], dimensions: dict[str, str]) -> bool:
    """Whether each dimension names that resource (by Ref or GetAtt, exactly) or that variant."""
    found = _dimensions(alarm)
    return found.keys() == dimensions.keys() and all(
        f'"{resource}"' in json.dumps(found[name]) for name, resource in dimensions.items()
    )


@pytest.mark.parametrize(("namespace", "metric", "dimensions"), OPERATIONS_ALARMS)
def test_given_operations_alarm_when_inspected_then_any_occurrence_notifies_the_alarm_topic(
    transformed: dict[str, Any], namespace: str, metric: str, dimensions: dict[str, str]
) -> None:
    (alarm,) = [a for a in _alarms_on(transformed, namespace, metric) if _watches(a, dimensions)]

    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (0, "GreaterThanThreshold")
    assert alarm["Period"] * alarm["EvaluationPeriods"] <= 900
    assert alarm["TreatMissingData"] == "notBreaching"
    assert alarm["AlarmActions"] == [ALARM_TOPIC]
    assert alarm["OKActions"] == [ALARM_TOPIC]


def test_given_every_dead_letter_queue_when_alarms_listed_then_each_alarms_on_any_message(
    transformed: dict[str, Any],
) -> None:
    queues = resources_of_type(transformed, "AWS::SQS::Queue").values()
    dead_letter_queues = sorted(
        queue["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
        for queue in queues
        if "RedrivePolicy" in queue["Properties"]
    )
    alarms = _alarms_on(transformed, "AWS/SQS", "ApproximateNumberOfMessagesVisible")

    watched = sorted(_dimensions(alarm)["QueueName"]["Fn::GetAtt"][0] for alarm in alarms)

    assert dead_letter_queues == ["PreviewCallbackDeadLetterQueue", "UploadEventsDeadLetterQueue"]
    assert watched == dead_letter_queues
    for alarm in alarms:
        assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (0, "GreaterThanThreshold")
        assert alarm["AlarmActions"] == alarm["OKActions"] == [ALARM_TOPIC]


def test_given_every_function_when_alarms_listed_then_each_has_an_errors_alarm_on_the_alarm_topic(
    transformed: dict[str, Any],
) -> None:
    functions = sorted(resources_of_type(transformed, "AWS::Lambda::Function"))
    errors_alarms = _alarms_on(transformed, "AWS/Lambda", "Errors")

    watched = sorted(_dimensions(alarm)["FunctionName"]["Ref"] for alarm in errors_alarms)

    assert watched == functions
    assert {alarm["Statistic"] for alarm in errors_alarms} == {"Sum"}
    assert all(alarm["AlarmActions"] == [ALARM_TOPIC] for alarm in errors_alarms)
    assert {alarm["TreatMissingData"] for alarm in errors_alarms} == {"notBreaching"}


def test_given_alarm_topic_when_inspected_then_cloudwatch_can_publish_and_email_is_optional(
    transformed: dict[str, Any],
) -> None:
    topic = transformed["Resources"]["AlarmTopic"]
    subscription = transformed["Resources"]["AlarmEmailSubscription"]

    # CloudWatch cannot use the AWS managed SNS key (SNS "Key management"): no alias/aws/sns here.
    assert "KmsMasterKeyId" not in topic.get("Properties", {})
    assert subscription["Condition"] == "HasAlarmEmail"
    assert subscription["Properties"]["TopicArn"] == ALARM_TOPIC
    assert transformed["Parameters"]["AlarmEmail"]["Default"] == ""
    assert transformed["Outputs"]["AlarmTopicArn"]["Value"] == ALARM_TOPIC


def test_given_jobs_api_when_transformed_then_only_the_v1_stage_exists(transformed: dict[str, Any]) -> None:
    stages = [
        r["Properties"]["StageName"]
        for r in resources_of_type(transformed, "AWS::ApiGateway::Stage").values()
    ]
    # A Deployment's StageName creates a stage too (SAM's stray "Stage" without OpenApiVersion).
    deployment_stages = [
        r["Properties"]["StageName"]
        for r in resources_of_type(transformed, "AWS::ApiGateway::Deployment").values()
        if "StageName" in r["Properties"]
    ]

    assert stages == ["v1"]
    assert deployment_stages == []


def test_given_jobs_api_stage_when_inspected_then_json_access_logs_go_to_a_retained_log_group(
    transformed: dict[str, Any],
) -> None:
    (stage,) = resources_of_type(transformed, "AWS::ApiGateway::Stage").values()
    setting = stage["Properties"]["AccessLogSetting"]
    group = transformed["Resources"]["JobsApiAccessLogGroup"]["Properties"]

    # messageString is API Gateway's already-quoted message: a JSON line once values are filled in.
    line = json.loads(setting["Format"].replace("$context.error.messageString", '"-"'))
    assert setting["DestinationArn"] == {"Fn::GetAtt": ["JobsApiAccessLogGroup", "Arn"]}
    assert {line["requestId"], line["extendedRequestId"]} == {
        "$context.requestId",
        "$context.extendedRequestId",
    }
    assert "$context.identity.apiKey" not in line.values()  # the key itself is a secret; its id is not
    assert 1 <= group["RetentionInDays"] <= 90


def test_given_access_logging_when_deployed_then_the_account_logging_role_is_set_before_the_api(
    transformed: dict[str, Any],
) -> None:
    resources = transformed["Resources"]
    account = resources["ApiGatewayAccount"]["Properties"]
    role = resources["ApiGatewayCloudWatchRole"]

    # The stage comes after the RestApi (through its deployment), which waits for the account setting.
    assert "ApiGatewayAccount" in as_list(resources["JobsApi"]["DependsOn"])
    assert account["CloudWatchRoleArn"] == {
        "Fn::If": [
            "CreatesApiGatewayCloudWatchRole",
            {"Fn::GetAtt": ["ApiGatewayCloudWatchRole", "Arn"]},
            {"Ref": "ApiGatewayCloudWatchRoleArn"},
        ]
    }
    # The setting outlives the stack: so must the role it names, or every API in the region stops logging.
    assert (role["DeletionPolicy"], role["UpdateReplacePolicy"]) == ("Retain", "Retain")
    assert role["Condition"] == "CreatesApiGatewayCloudWatchRole"
    assert role["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
        "Service": "apigateway.amazonaws.com"
    }


def test_given_preview_endpoint_when_named_then_its_log_group_is_created_first_with_retention(
    transformed: dict[str, Any],
) -> None:
    endpoint = transformed["Resources"]["PreviewEndpoint"]
    group = transformed["Resources"]["PreviewEndpointLogGroup"]

    assert endpoint["Properties"]["EndpointName"] == {"Fn::Sub": "${AWS::StackName}-preview"}
    assert group["Properties"]["LogGroupName"] == {
        "Fn::Sub": "/aws/sagemaker/Endpoints/${AWS::StackName}-preview"
    }
    assert "PreviewEndpointLogGroup" in as_list(endpoint["DependsOn"])
    assert 1 <= group["Properties"]["RetentionInDays"] <= 90


def test_given_shared_training_log_group_when_inspected_then_opt_in_and_retained(
    transformed: dict[str, Any],
) -> None:
    group = transformed["Resources"]["TrainingJobsLogGroup"]

    assert group["Properties"]["LogGroupName"] == "/aws/sagemaker/TrainingJobs"
    assert group["Condition"] == "CreatesTrainingJobsLogGroup"
    assert transformed["Parameters"]["CreateTrainingJobsLogGroup"]["Default"] == "false"
    # Shared with every SageMaker user of the region: deleting the stack must not take it along.
    assert (group["DeletionPolicy"], group["UpdateReplacePolicy"]) == ("Retain", "Retain")


def test_given_log_groups_when_listed_then_each_has_retention(transformed: dict[str, Any]) -> None:
    groups = resources_of_type(transformed, "AWS::Logs::LogGroup")

    assert [name for name, group in groups.items() if "RetentionInDays" not in group["Properties"]] == []
    assert len(groups) >= 8


def test_given_preview_scaling_when_inspected_then_max_capacity_is_the_parameter_defaulting_to_one(
    transformed: dict[str, Any],
) -> None:
    target = transformed["Resources"]["PreviewEndpointScalableTarget"]["Properties"]
    parameter = transformed["Parameters"]["PreviewMaxInstanceCount"]

    assert target["MaxCapacity"] == {"Ref": "PreviewMaxInstanceCount"}
    assert (parameter["Default"], parameter["MinValue"]) == (1, 1)
    assert parameter["MaxValue"] <= 10


def test_given_url_expiry_parameter_when_compared_with_api_settings_then_both_cap_at_the_session_limit(
    template: dict[str, Any],
) -> None:
    parameter = template["Parameters"]["UrlExpirySeconds"]

    assert parameter["MaxValue"] == MAX_URL_EXPIRY_SECONDS == 12 * 3600
    assert parameter["MinValue"] <= parameter["Default"] <= parameter["MaxValue"]
    assert "credentials" in parameter["Description"]


def test_given_preview_auto_scaling_switch_when_inspected_then_it_removes_every_scaling_resource(
    transformed: dict[str, Any],
) -> None:
    scaling = {
        logical_id
        for logical_id, resource in transformed["Resources"].items()
        if resource["Type"].startswith("AWS::ApplicationAutoScaling::")
        or "PreviewEndpointScaleFromZero" in json.dumps(resource.get("Properties", {}).get("AlarmActions"))
    }
    # An instance type change is refused while any of them keeps the variant registered.
    unswitched = sorted(
        logical_id
        for logical_id in scaling
        if transformed["Resources"][logical_id].get("Condition")
        not in ("HasPreviewAutoScaling", "HasLargeModelPreviewAutoScaling")
    )

    assert len(scaling) == 8  # four per preview endpoint
    assert unswitched == []
    # The large endpoint's scaling needs both switches on.
    assert transformed["Conditions"]["HasLargeModelPreviewAutoScaling"] == {
        "Fn::And": [{"Condition": "HasLargeModels"}, {"Condition": "HasPreviewAutoScaling"}]
    }
    assert transformed["Parameters"]["PreviewAutoScaling"]["Default"] == "true"
