"""IAM of the deployed (SAM-transformed) template: named actions only, `*` resources only where required."""

from __future__ import annotations

import copy
from typing import Any

from template_helpers import as_list, policy_statements, resources_of_type, wildcard_actions

# Actions that accept no resource-level permission, so `"Resource": "*"` is the only valid form.
ACTIONS_WITHOUT_RESOURCE_LEVEL = {
    "ecr:GetAuthorizationToken",
    "cloudwatch:PutMetricData",
    "logs:CreateLogDelivery",
    "logs:GetLogDelivery",
    "logs:UpdateLogDelivery",
    "logs:DeleteLogDelivery",
    "logs:ListLogDeliveries",
    "logs:PutResourcePolicy",
    "logs:DescribeResourcePolicies",
    "logs:DescribeLogGroups",
}

# AWS managed policies SAM attaches (logs, X-Ray tracing, SQS polling); each was reviewed.
REVIEWED_MANAGED_POLICIES = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    "arn:aws:iam::aws:policy/service-role/AWSLambdaSQSQueueExecutionRole",
    # API Gateway's account-wide CloudWatch Logs role (access logs), as AWS documents it.
    "arn:aws:iam::aws:policy/service-role/AmazonAPIGatewayPushToCloudWatchLogs",
}


def _aws_managed_policy(value: Any) -> str | None:
    """An AWS managed policy's ARN (a partition-aware `!Sub` read as in the aws partition); None for a
    `Ref` to the stack's own managed policy, whose statements the other tests walk."""
    if isinstance(value, dict):
        return value["Fn::Sub"].replace("${AWS::Partition}", "aws") if "Fn::Sub" in value else None
    return str(value)


def _allow_statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(owner, s) for owner, s in policy_statements(template) if s.get("Effect") == "Allow"]


def test_given_transformed_template_when_policies_walked_then_no_allow_statement_has_wildcard_action(
    transformed: dict[str, Any],
) -> None:
    statements = _allow_statements(transformed)
    offenders = [(owner, wildcard_actions(s)) for owner, s in statements if wildcard_actions(s)]

    # Every function role, the state machine role, the SageMaker role and the queue policy.
    assert len({owner for owner, _ in statements}) >= 7
    assert offenders == []


def test_given_role_granting_service_wildcard_when_policies_walked_then_it_is_reported(
    transformed: dict[str, Any],
) -> None:
    tampered = copy.deepcopy(transformed)
    role = tampered["Resources"]["SageMakerExecutionRole"]["Properties"]
    role["Policies"][0]["PolicyDocument"]["Statement"].append(
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:*"], "Resource": "*"}
    )

    offenders = [wildcard_actions(s) for owner, s in policy_statements(tampered) if wildcard_actions(s)]

    assert offenders == [["s3:*"]]


def test_given_transformed_template_when_resource_is_star_then_only_actions_without_resource_level(
    transformed: dict[str, Any],
) -> None:
    star_actions = {
        action
        for _, statement in _allow_statements(transformed)
        if "*" in as_list(statement.get("Resource", []))
        for action in as_list(statement["Action"])
    }

    assert star_actions <= ACTIONS_WITHOUT_RESOURCE_LEVEL


def test_given_sagemaker_role_when_putting_metrics_then_limited_to_sagemaker_namespaces(
    transformed: dict[str, Any],
) -> None:
    metric_statements = [
        s
        for owner, s in _allow_statements(transformed)
        if owner == "SageMakerExecutionRole" and "cloudwatch:PutMetricData" in as_list(s["Action"])
    ]

    assert [s["Condition"] for s in metric_statements] == [
        {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}}
    ]


def test_given_roles_when_managed_policies_listed_then_only_reviewed_aws_policies(
    transformed: dict[str, Any],
) -> None:
    attached = {
        _aws_managed_policy(arn)
        for role in resources_of_type(transformed, "AWS::IAM::Role").values()
        for arn in role["Properties"].get("ManagedPolicyArns", [])
    } - {None}

    assert attached <= REVIEWED_MANAGED_POLICIES


def test_given_state_machine_role_when_passing_the_training_role_then_only_to_sagemaker(
    transformed: dict[str, Any],
) -> None:
    pass_role = [s for owner, s in _allow_statements(transformed) if "iam:PassRole" in as_list(s["Action"])]

    assert len(pass_role) == 1
    assert pass_role[0]["Resource"] == {"Fn::GetAtt": ["SageMakerExecutionRole", "Arn"]}
    assert pass_role[0]["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}


def test_given_state_machine_role_when_running_training_jobs_then_scoped_to_loraflow_jobs(
    transformed: dict[str, Any],
) -> None:
    sagemaker_statements = [
        s
        for owner, s in _allow_statements(transformed)
        if owner == "TrainingPipelineRole" and any(a.startswith("sagemaker:") for a in as_list(s["Action"]))
    ]

    assert len(sagemaker_statements) == 1
    assert sagemaker_statements[0]["Resource"]["Fn::Sub"].endswith(":training-job/loraflow-*")
    assert set(sagemaker_statements[0]["Action"]) >= {
        "sagemaker:CreateTrainingJob",
        "sagemaker:DescribeTrainingJob",
        "sagemaker:StopTrainingJob",
    }


def test_given_callback_role_when_completing_tasks_then_only_on_the_training_pipeline(
    transformed: dict[str, Any],
) -> None:
    task_statements = [
        s
        for owner, s in _allow_statements(transformed)
        if any(a in ("states:SendTaskSuccess", "states:SendTaskFailure") for a in as_list(s["Action"]))
    ]

    assert {str(s["Resource"]) for s in task_statements} == {str({"Ref": "TrainingPipeline"})}


def test_given_jobs_api_role_when_generating_then_invokes_only_the_preview_endpoints_with_its_requests(
    transformed: dict[str, Any],
) -> None:
    statements = [s for owner, s in _allow_statements(transformed) if owner == "JobsApiFunctionRole"]
    invoke = [s for s in statements if "sagemaker:InvokeEndpointAsync" in as_list(s["Action"])]
    writes = [s for s in statements if "s3:PutObject" in as_list(s["Action"])]

    assert len(invoke) == 1 and as_list(invoke[0]["Action"]) == ["sagemaker:InvokeEndpointAsync"]
    assert invoke[0]["Resource"] == [
        {"Ref": "PreviewEndpoint"},
        {"Fn::If": ["HasLargeModels", {"Ref": "LargeModelPreviewEndpoint"}, {"Ref": "AWS::NoValue"}]},
    ]
    # The request JSON only (SageMaker's own role reads it); cancel markers come from JobControlPolicy.
    assert [s["Resource"] for s in writes] == [
        {"Fn::Sub": "${ArtifactsBucket.Arn}/async-inference/requests/*"}
    ]
