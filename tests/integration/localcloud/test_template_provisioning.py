"""`LocalCloud` on the real template.yaml: every resource exists in moto as the template declares it.

Expectations are read from template.yaml itself (never a second list of resources), and checked through
the endpoints a user gets (endpoints.json), with plain boto3 and HTTP.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode
from loraflow_local.client import StackClient
from loraflow_local.cloud import DEFAULT_TEMPLATE, LocalCloud

pytestmark = pytest.mark.integration

TEMPLATE, _ = decode(str(DEFAULT_TEMPLATE))
RESOURCES: dict[str, Any] = TEMPLATE["Resources"]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    # A base model URI of our own: building the tiny model is the end-to-end test's business.
    with LocalCloud(
        tmp_path_factory.mktemp("provisioning") / "state",
        parameter_overrides={"DefaultBaseModel": "s3://somewhere/base/"},
    ) as running:
        yield running


def _client(cloud: LocalCloud, service: str) -> Any:
    return StackClient(cloud.endpoints).client(service)


def _get(url: str, api_key: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, headers={"x-api-key": api_key} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_given_cloud_up_when_reading_state_dir_then_endpoints_json_matches(cloud: LocalCloud):
    written = json.loads((cloud.state_dir / "endpoints.json").read_text())
    assert written == cloud.endpoints
    for key in (
        "aws_endpoint_url",
        "region",
        "api_url",
        "api_key",
        "dataset_bucket",
        "notification_topic_arn",
        "artifacts_bucket",
        "state_machine_arn",
        "jobs_table",
    ):
        assert written[key], key
    assert written["api_url"].startswith("http://127.0.0.1:") and written["api_url"].endswith("/v1")


def test_given_template_when_provisioned_then_dataset_bucket_notifies_the_upload_queue(cloud: LocalCloud):
    s3, sqs = _client(cloud, "s3"), _client(cloud, "sqs")
    configuration = s3.get_bucket_notification_configuration(Bucket=cloud.endpoints["dataset_bucket"])
    declared = RESOURCES["DatasetBucket"]["Properties"]["NotificationConfiguration"]["QueueConfigurations"]
    queue_url = cloud.deployed["UploadEventsQueue"].ref
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert sorted((c["QueueArn"], c["Events"]) for c in configuration["QueueConfigurations"]) == sorted(
        (attributes["QueueArn"], [item["Event"]]) for item in declared
    )
    assert attributes["DelaySeconds"] == "3"  # SettleSeconds, locally
    assert attributes["VisibilityTimeout"] == str(
        RESOURCES["UploadEventsQueue"]["Properties"]["VisibilityTimeout"]
    )
    dead_letter = json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"]
    assert dead_letter == cloud.deployed["UploadEventsDeadLetterQueue"].attributes["Arn"]


def test_given_template_when_provisioned_then_jobs_table_has_the_declared_keys_and_index(cloud: LocalCloud):
    table = _client(cloud, "dynamodb").describe_table(TableName=cloud.endpoints["jobs_table"])["Table"]
    declared = RESOURCES["JobsTable"]["Properties"]
    assert table["KeySchema"] == declared["KeySchema"]
    indexes = {index["IndexName"]: index["KeySchema"] for index in table["GlobalSecondaryIndexes"]}
    assert indexes == {index["IndexName"]: index["KeySchema"] for index in declared["GlobalSecondaryIndexes"]}


def test_given_template_when_provisioned_then_topics_exist_and_preview_topics_reach_the_callback(
    cloud: LocalCloud,
):
    sns = _client(cloud, "sns")
    topics = {topic["TopicArn"] for topic in sns.list_topics()["Topics"]}
    declared = [name for name, resource in RESOURCES.items() if resource["Type"] == "AWS::SNS::Topic"]
    assert topics == {cloud.deployed[name].ref for name in declared}
    callback_arn = cloud.deployed["PreviewCallbackFunction"].attributes["Arn"]
    for topic in ("PreviewSuccessTopic", "PreviewErrorTopic"):
        subscriptions = sns.list_subscriptions_by_topic(TopicArn=cloud.deployed[topic].ref)["Subscriptions"]
        assert [(s["Protocol"], s["Endpoint"]) for s in subscriptions] == [("lambda", callback_arn)]


def test_given_template_when_provisioned_then_functions_exist_with_resolved_environment(cloud: LocalCloud):
    functions = {f["FunctionName"]: f for f in _client(cloud, "lambda").list_functions()["Functions"]}
    declared = [
        name for name, resource in RESOURCES.items() if resource["Type"] == "AWS::Serverless::Function"
    ]
    assert sorted(functions) == sorted(cloud.deployed[name].ref for name in declared)
    ingest = functions[cloud.deployed["IngestDatasetFunction"].ref]["Environment"]["Variables"]
    assert ingest["JOBS_TABLE"] == cloud.endpoints["jobs_table"]
    assert ingest["STATE_MACHINE_ARN"] == cloud.endpoints["state_machine_arn"]
    assert ingest["SETTLE_SECONDS"] == "3"
    assert ingest["DEFAULT_BASE_MODEL"] == "s3://somewhere/base/"


def test_given_template_when_provisioned_then_state_machine_runs_the_substituted_asl(cloud: LocalCloud):
    machine = _client(cloud, "stepfunctions").describe_state_machine(
        stateMachineArn=cloud.endpoints["state_machine_arn"]
    )
    definition = json.loads(machine["definition"])
    source = json.loads(
        Path(
            DEFAULT_TEMPLATE.parent, RESOURCES["TrainingPipeline"]["Properties"]["DefinitionUri"]
        ).read_text()
    )
    assert set(definition["States"]) == set(source["States"])
    assert "${" not in machine["definition"]
    assert cloud.deployed["PipelineTasksFunction"].attributes["Arn"] in machine["definition"]


def test_given_template_when_provisioned_then_preview_endpoint_is_async_with_the_preview_topics(
    cloud: LocalCloud,
):
    sagemaker = _client(cloud, "sagemaker")
    endpoint_name = cloud.deployed["PreviewEndpoint"].attributes["EndpointName"]
    endpoint = sagemaker.describe_endpoint(EndpointName=endpoint_name)
    assert endpoint["EndpointStatus"] == "InService"
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    notifications = config["AsyncInferenceConfig"]["OutputConfig"]["NotificationConfig"]
    assert notifications == {
        "SuccessTopic": cloud.deployed["PreviewSuccessTopic"].ref,
        "ErrorTopic": cloud.deployed["PreviewErrorTopic"].ref,
    }


def test_given_api_when_called_without_or_with_wrong_key_then_forbidden(cloud: LocalCloud):
    url = cloud.endpoints["api_url"] + "/jobs?dataset=0001-dataset"
    assert _get(url, None) == (403, {"message": "Forbidden"})
    assert _get(url, "not-the-key") == (403, {"message": "Forbidden"})


def test_given_api_when_called_with_key_then_the_jobs_function_answers(cloud: LocalCloud):
    status, body = _get(cloud.endpoints["api_url"] + "/jobs?dataset=0001-dataset", cloud.endpoints["api_key"])
    assert status == 200
    assert body["items"] == []


def test_given_api_when_path_or_stage_unknown_then_missing_authentication_token(cloud: LocalCloud):
    base = cloud.endpoints["api_url"]
    expected = (403, {"message": "Missing Authentication Token"})
    assert _get(base + "/nothing-here", cloud.endpoints["api_key"]) == expected
    assert _get(base.replace("/v1", "/v2") + "/jobs", cloud.endpoints["api_key"]) == expected


def test_given_skipped_resources_when_provisioned_then_each_has_a_known_reason(cloud: LocalCloud):
    from loraflow_local.provision import SKIPPED_TYPES

    assert cloud.context is not None
    assert cloud.context.skipped, "the template has policies and alarms the local cloud skips"
    assert set(cloud.context.skipped.values()) <= set(SKIPPED_TYPES)
