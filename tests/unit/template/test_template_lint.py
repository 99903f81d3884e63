"""The template as a whole: cfn-lint clean, real parameter defaults, the outputs users and tools read."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from cfnlint.api import ManualArgs, lint_file
from template_helpers import REPO_ROOT, TEMPLATE_PATH

EXPECTED_OUTPUTS = {
    "DatasetBucketName",
    "ArtifactsBucketName",
    "ApiUrl",
    "ApiKeyId",
    "NotificationTopicArn",
    "AlarmTopicArn",
    "StateMachineArn",
    "PreviewEndpointName",
    "LargeModelPreviewEndpointName",
    "JobsTableName",
}


def test_given_template_when_linted_with_cfn_lint_then_no_findings() -> None:
    # Errors, warnings and informational checks (e.g. what happens to stateful data on delete).
    matches = lint_file(TEMPLATE_PATH, config=ManualArgs(include_checks=["I"]))

    assert [str(match) for match in matches] == []


# Optional values whose absence has a meaning (no subscription; the stack creates the role itself).
OPTIONAL_PARAMETERS = {
    "NotificationEmail",
    "AlarmEmail",
    "ApiGatewayCloudWatchRoleArn",
    "HuggingFaceTokenSecretArn",
}


def test_given_parameters_when_inspected_then_each_has_a_real_default(template: dict[str, Any]) -> None:
    parameters = template["Parameters"]
    # Only the optional ones may be empty: everything else deploys as is.
    empty = [
        name
        for name, p in parameters.items()
        if p.get("Default") in (None, "") and name not in OPTIONAL_PARAMETERS
    ]

    assert empty == []
    assert {parameters[name]["Default"] for name in OPTIONAL_PARAMETERS} == {""}


def test_given_template_when_outputs_listed_then_contract_outputs_present(
    transformed: dict[str, Any],
) -> None:
    outputs = transformed["Outputs"]

    assert set(outputs) == EXPECTED_OUTPUTS
    # The key SAM generates for the API must exist in the deployed template.
    assert transformed["Resources"][outputs["ApiKeyId"]["Value"]["Ref"]]["Type"] == "AWS::ApiGateway::ApiKey"
    assert outputs["ApiUrl"]["Value"] == {
        "Fn::Sub": "https://${JobsApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/v1"
    }


def test_given_email_parameter_when_empty_then_no_subscription_is_created(template: dict[str, Any]) -> None:
    subscription = template["Resources"]["NotificationEmailSubscription"]

    assert subscription["Condition"] == "HasNotificationEmail"
    assert template["Conditions"]["HasNotificationEmail"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "NotificationEmail"}, ""]}]
    }


def test_given_preview_endpoint_when_configured_then_async_results_land_in_artifacts_and_notify_callback(
    transformed: dict[str, Any],
) -> None:
    config = transformed["Resources"]["PreviewEndpointConfig"]["Properties"]
    output = config["AsyncInferenceConfig"]["OutputConfig"]

    assert output["S3OutputPath"] == {"Fn::Sub": "s3://${ArtifactsBucket}/async-inference/responses"}
    assert output["S3FailurePath"] == {"Fn::Sub": "s3://${ArtifactsBucket}/async-inference/failures"}
    assert output["NotificationConfig"] == {
        "SuccessTopic": {"Ref": "PreviewSuccessTopic"},
        "ErrorTopic": {"Ref": "PreviewErrorTopic"},
    }
    assert config["AsyncInferenceConfig"]["ClientConfig"] == {"MaxConcurrentInvocationsPerInstance": 1}


def test_given_preview_endpoint_when_idle_then_it_can_scale_to_zero_and_back(
    transformed: dict[str, Any],
) -> None:
    resources = transformed["Resources"]
    target = resources["PreviewEndpointScalableTarget"]["Properties"]
    alarm = resources["PreviewEndpointBacklogAlarm"]["Properties"]

    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, {"Ref": "PreviewMaxInstanceCount"})
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity"
    assert alarm["AlarmActions"] == [{"Ref": "PreviewEndpointScaleFromZero"}]
    assert resources["PreviewEndpointScaleFromZero"]["Properties"]["ScalingTargetId"] == {
        "Ref": "PreviewEndpointScalableTarget"
    }


def test_given_images_when_referenced_then_built_from_repository_parameters_and_image_tag(
    template: dict[str, Any],
) -> None:
    model_image = template["Resources"]["PreviewModel"]["Properties"]["PrimaryContainer"]["Image"]
    training_image = template["Resources"]["TrainingPipeline"]["Properties"]["DefinitionSubstitutions"][
        "TrainingImageUri"
    ]
    registry = "${AWS::AccountId}.dkr.ecr.${AWS::Region}.${AWS::URLSuffix}"

    assert model_image == {"Fn::Sub": f"{registry}/${{InferenceRepositoryName}}:${{ImageTag}}"}
    assert training_image == {"Fn::Sub": f"{registry}/${{TrainingRepositoryName}}:${{ImageTag}}"}


def test_given_samconfig_when_read_then_deploys_stack_with_iam_capability_and_managed_bucket() -> None:
    config = tomllib.loads((REPO_ROOT / "samconfig.toml").read_text(encoding="utf-8"))
    deploy = config["default"]["deploy"]["parameters"]

    assert deploy["stack_name"] == "loraflow"
    assert deploy["capabilities"] == "CAPABILITY_IAM"
    assert deploy["resolve_s3"] is True
    assert deploy["confirm_changeset"] is True
    assert "parameters" in config["default"]["build"]


def test_given_template_with_impossible_queue_timeout_when_linted_then_finding_reported(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "template.yaml"
    text = TEMPLATE_PATH.read_text(encoding="utf-8")
    broken.write_text(text.replace("VisibilityTimeout: 1800", "VisibilityTimeout: 99999"), encoding="utf-8")

    rule_ids = {match.rule.id for match in lint_file(broken)}

    assert "E3034" in rule_ids
