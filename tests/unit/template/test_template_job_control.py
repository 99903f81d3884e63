"""The template's side of job control, lost callbacks, preview timing, cost and gated models."""

from __future__ import annotations

from typing import Any

import pytest
from loraflow_shared.families import COMPUTE_CLASSES, FAMILY_FACTS
from loraflow_shared.jobs.cost import parse_price_table
from loraflow_shared.jobs.preview_timing import MAX_PREVIEW_TIMEOUT_S, MIN_PREVIEW_TIMEOUT_S
from template_helpers import as_list, resources_of_type

FAILURE_QUEUE = {"Fn::GetAtt": ["PreviewCallbackFailureQueue", "Arn"]}


def _statements_by_sid(template: dict[str, Any], logical_id: str) -> dict[str, dict[str, Any]]:
    document = template["Resources"][logical_id]["Properties"]["PolicyDocument"]
    return {statement["Sid"]: statement for statement in document["Statement"]}


def test_given_job_control_policy_when_read_then_only_what_cancel_and_retry_need_on_loraflow_resources(
    transformed: dict[str, Any],
) -> None:
    statements = _statements_by_sid(transformed, "JobControlPolicy")

    assert {sid: s["Action"] for sid, s in statements.items()} == {
        "StartAttempts": "states:StartExecution",
        "StopAttempts": "states:StopExecution",
        "StopTrainingJobs": "sagemaker:StopTrainingJob",
        "CancelPreviewRenders": "s3:PutObject",
    }
    assert statements["StartAttempts"]["Resource"] == {"Ref": "TrainingPipeline"}
    assert statements["StopAttempts"]["Resource"]["Fn::Sub"].endswith(":execution:${TrainingPipeline.Name}:*")
    assert statements["StopTrainingJobs"]["Resource"]["Fn::Sub"].endswith(":training-job/loraflow-*")
    assert statements["CancelPreviewRenders"]["Resource"]["Fn::Sub"].endswith("/async-inference/cancelled/*")


@pytest.mark.parametrize("role", ["IngestDatasetFunctionRole", "JobsApiFunctionRole"])
def test_given_functions_that_cancel_when_roles_read_then_they_have_job_control(
    transformed: dict[str, Any], role: str
) -> None:
    assert {"Ref": "JobControlPolicy"} in transformed["Resources"][role]["Properties"]["ManagedPolicyArns"]


def test_given_state_machine_role_when_syncing_training_jobs_then_the_documented_actions_incl_list_tags(
    transformed: dict[str, Any],
) -> None:
    document = transformed["Resources"]["TrainingPipelineRole"]["Properties"]["Policies"]
    actions = {
        action
        for policy in document
        for statement in as_list(policy["PolicyDocument"]["Statement"])
        for action in as_list(statement.get("Action", []))
    }
    # Step Functions, "IAM policies for Amazon SageMaker AI" (createTrainingJob.sync).
    assert {
        "sagemaker:CreateTrainingJob",
        "sagemaker:DescribeTrainingJob",
        "sagemaker:StopTrainingJob",
        "sagemaker:AddTags",
        "sagemaker:ListTags",
    } <= actions


def test_given_preview_callback_when_it_fails_or_sns_cannot_deliver_then_kept_in_the_failure_queue(
    transformed: dict[str, Any],
) -> None:
    resources = transformed["Resources"]
    [invoke_config] = resources_of_type(transformed, "AWS::Lambda::EventInvokeConfig").values()
    subscriptions = [
        s["Properties"]
        for s in resources_of_type(transformed, "AWS::SNS::Subscription").values()
        if s["Properties"]["Protocol"] == "lambda"
    ]
    mappings = resources_of_type(transformed, "AWS::Lambda::EventSourceMapping").values()
    from_failures = [m["Properties"] for m in mappings if m["Properties"]["EventSourceArn"] == FAILURE_QUEUE]

    assert invoke_config["Properties"]["FunctionName"] == {"Ref": "PreviewCallbackFunction"}
    assert invoke_config["Properties"]["DestinationConfig"]["OnFailure"]["Destination"] == FAILURE_QUEUE
    assert len(subscriptions) == 2
    assert all(s["RedrivePolicy"] == {"deadLetterTargetArn": FAILURE_QUEUE} for s in subscriptions)
    # The callback turns those messages into a failed preview task; what it cannot resolve goes on.
    [mapping] = from_failures
    assert mapping["FunctionName"] == {"Ref": "PreviewCallbackFunction"}
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    redrive = resources["PreviewCallbackFailureQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["PreviewCallbackDeadLetterQueue", "Arn"]}


def test_given_failure_queue_policy_when_read_then_only_the_preview_topics_may_redrive_there(
    transformed: dict[str, Any],
) -> None:
    [statement] = _statements_by_sid(transformed, "PreviewCallbackFailureQueuePolicy").values()

    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"] == [
        {"Ref": "PreviewSuccessTopic"},
        {"Ref": "PreviewErrorTopic"},
    ]


def test_given_preview_timeout_parameter_when_read_then_bounds_are_what_async_inference_can_fit(
    template: dict[str, Any],
) -> None:
    parameter = template["Parameters"]["PreviewTimeoutSeconds"]

    assert (parameter["MinValue"], parameter["MaxValue"]) == (MIN_PREVIEW_TIMEOUT_S, MAX_PREVIEW_TIMEOUT_S)
    assert MIN_PREVIEW_TIMEOUT_S <= parameter["Default"] <= MAX_PREVIEW_TIMEOUT_S
    pipeline = template["Resources"]["PipelineTasksFunction"]["Properties"]["Environment"]["Variables"]
    machine = template["Resources"]["TrainingPipeline"]["Properties"]["DefinitionSubstitutions"]
    assert (
        pipeline["PREVIEW_TIMEOUT_SECONDS"]
        == machine["PreviewTimeoutSeconds"]
        == {"Ref": "PreviewTimeoutSeconds"}
    )


def test_given_default_price_table_when_parsed_then_every_training_instance_type_has_a_price(
    template: dict[str, Any],
) -> None:
    prices = parse_price_table(template["Parameters"]["TrainingPricesPerHour"]["Default"])
    parameters = template["Parameters"]
    offered = {
        instance_type
        for name in ("TrainingInstanceType", "LargeModelTrainingInstanceType")
        for instance_type in parameters[name]["AllowedValues"]
    }

    assert offered <= set(prices)
    assert all(0 < price < 100 for price in prices.values())


def test_given_hugging_face_token_when_configured_then_only_the_sagemaker_role_reads_that_secret(
    template: dict[str, Any],
) -> None:
    parameter = template["Parameters"]["HuggingFaceTokenSecretArn"]
    role_statements = template["Resources"]["SageMakerExecutionRole"]["Properties"]["Policies"][0][
        "PolicyDocument"
    ]["Statement"]
    [conditional] = [s for s in role_statements if "Fn::If" in s]
    condition, granted, otherwise = conditional["Fn::If"]
    environment = template["Resources"]["PreviewModel"]["Properties"]["PrimaryContainer"]["Environment"]
    machine = template["Resources"]["TrainingPipeline"]["Properties"]["DefinitionSubstitutions"]

    assert parameter["Default"] == "" and parameter["AllowedPattern"].startswith("^$|")
    assert condition == "HasHuggingFaceToken"
    assert (granted["Action"], granted["Resource"]) == (
        "secretsmanager:GetSecretValue",
        {"Ref": "HuggingFaceTokenSecretArn"},
    )
    assert otherwise == {"Ref": "AWS::NoValue"}
    assert environment["HF_TOKEN_SECRET_ARN"] == machine["HuggingFaceTokenSecretArn"]


def test_given_capacity_wait_parameter_when_read_then_the_pipeline_gets_it(
    template: dict[str, Any],
) -> None:
    parameter = template["Parameters"]["CapacityWaitSeconds"]
    pipeline = template["Resources"]["PipelineTasksFunction"]["Properties"]["Environment"]["Variables"]

    assert pipeline["CAPACITY_WAIT_SECONDS"] == {"Ref": "CapacityWaitSeconds"}
    assert parameter["MinValue"] == 0 and parameter["Default"] > 0


def test_given_compute_class_parameters_when_described_then_each_names_its_families(
    template: dict[str, Any],
) -> None:
    """The families each instance parameter serves, as `loraflow_shared.families` assigns them."""
    parameters = template["Parameters"]
    by_class = {
        compute: [facts.label for facts in FAMILY_FACTS if facts.compute == compute]
        for compute in COMPUTE_CLASSES
    }
    described = {
        "standard": ("TrainingInstanceType", "InferenceInstanceType"),
        "large": ("LargeModelTrainingInstanceType", "LargeModelInferenceInstanceType", "LargeModelFamilies"),
    }

    for compute, names in described.items():
        for name in names:
            description = " ".join(parameters[name]["Description"].split())
            assert all(label in description for label in by_class[compute]), (name, by_class[compute])
    assert set(described) == set(COMPUTE_CLASSES)
