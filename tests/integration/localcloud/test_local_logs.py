"""Log lines where users look: CloudWatch Logs in moto (`aws logs tail/filter-log-events`) and files on disk.

Functions run in-process, several at once: each invocation's stdout/stderr must land in its own function's
log group only. Training jobs' output lands in `/aws/sagemaker/TrainingJobs`, as on SageMaker.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError
from loraflow_local.services import LocalServices

pytestmark = pytest.mark.integration

Client = Callable[[str], Any]
LAMBDA_STREAM = re.compile(r"^\d{4}/\d{2}/\d{2}/\[\$LATEST\][0-9a-f]{32}$")


def _events(client: Client, group: str, stream_prefix: str | None = None) -> list[dict[str, Any]]:
    """The group's events, oldest first; none while the group does not exist yet."""
    pages = client("logs").get_paginator("filter_log_events")
    arguments = {"logGroupName": group} | ({"logStreamNamePrefix": stream_prefix} if stream_prefix else {})
    try:
        return [event for page in pages.paginate(**arguments) for event in page["events"]]
    except ClientError as error:
        if error.response["Error"]["Code"] != "ResourceNotFoundException":
            raise
        return []


def _invoke(client: Client, name: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = client("lambda").invoke(FunctionName=name, Payload=json.dumps(payload).encode())
    result: dict[str, Any] = json.loads(response["Payload"].read())
    return result


def test_given_function_logging_when_invoked_then_its_lines_are_in_its_log_group_and_its_file(
    services: LocalServices, deploy_function: Callable[..., str], client: Client
):
    deploy_function("talker", "loraflow_local_logging_handler.handler")

    _invoke(client, "talker", {"marker": "m-1"})
    services.logs.flush()

    events = _events(client, "/aws/lambda/talker")
    messages = [event["message"] for event in events]
    assert messages[0].startswith("START RequestId: ")
    powertools_line = json.loads(messages[1])
    assert (powertools_line["message"], powertools_line["marker"]) == ("working", "m-1")
    assert messages[2] == "printed by m-1"
    assert messages[3].startswith("END RequestId: ")
    assert messages[4].startswith("REPORT RequestId: ") and "Duration: " in messages[4]
    assert {event["logStreamName"] for event in events} == {events[0]["logStreamName"]}
    assert LAMBDA_STREAM.match(events[0]["logStreamName"])
    on_disk = (services.state_dir / "logs" / "lambda" / "talker.log").read_text().splitlines()
    assert on_disk == messages


def test_given_two_functions_running_at_once_when_both_log_then_each_group_has_only_its_own_lines(
    services: LocalServices, deploy_function: Callable[..., str], client: Client
):
    for name in ("left", "right"):
        deploy_function(name, "loraflow_local_logging_handler.handler")
    _invoke(client, "left", {"marker": "warm-up"})  # one cold start first: both share the module's Logger

    threads = [
        threading.Thread(target=_invoke, args=(client, name, {"marker": name, "lines": 20, "pause_s": 0.01}))
        for name in ("left", "right")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    services.logs.flush()

    for name, other in (("left", "right"), ("right", "left")):
        messages = [event["message"] for event in _events(client, f"/aws/lambda/{name}")]
        markers = [json.loads(m)["marker"] for m in messages if m.startswith("{")]
        assert markers.count(name) == 20
        assert other not in markers
        assert f"printed by {name}" in messages and f"printed by {other}" not in messages


def test_given_handler_raising_when_invoked_then_error_with_traceback_logged_as_one_event(
    services: LocalServices, deploy_function: Callable[..., str], client: Client
):
    deploy_function("failing-fn", "loraflow_local_test_handlers.fail")

    _invoke(client, "failing-fn", {})
    services.logs.flush()

    messages = [event["message"] for event in _events(client, "/aws/lambda/failing-fn")]
    (error,) = [message for message in messages if message.startswith("[ERROR]")]
    assert error.startswith("[ERROR] InvalidDatasetError: dataset 0001 has no config\nTraceback")


def test_given_training_job_when_it_prints_then_lines_are_in_the_training_jobs_group(
    services: LocalServices, client: Client, wait_for: Callable[..., Any]
):
    s3 = client("s3")
    for bucket in ("datasets", "artifacts"):
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket="datasets", Key="0001/10_dwjz/a.png", Body=b"png")
    client("sagemaker").create_training_job(
        TrainingJobName="job-logs",
        AlgorithmSpecification={"TrainingImage": "x", "TrainingInputMode": "File"},
        RoleArn="arn:aws:iam::123456789012:role/sm",
        HyperParameters={"mode": "succeed"},
        InputDataConfig=[
            {
                "ChannelName": "dataset",
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://datasets/0001/"}},
            }
        ],
        OutputDataConfig={"S3OutputPath": "s3://artifacts/training"},
        ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
        StoppingCondition={"MaxRuntimeInSeconds": 60},
    )

    def shipped() -> list[dict[str, Any]]:
        services.logs.flush()
        return _events(client, "/aws/sagemaker/TrainingJobs", stream_prefix="job-logs/")

    (event,) = wait_for(shipped)
    assert event["message"] == "step=1 loss=0.5"
    assert re.fullmatch(r"job-logs/algo-1-\d{10}", event["logStreamName"])
