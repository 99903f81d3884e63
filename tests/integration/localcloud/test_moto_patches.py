"""One test group per moto patch: each pins the upstream seam (it exists, with the expected signature) and
checks the patched behaviour through the public AWS API, so an upstream change fails here first."""

from __future__ import annotations

import inspect
import io
import json
import math
import re
import signal
import tarfile
import time
from collections.abc import Callable
from typing import Any

import moto
import pytest
from botocore.exceptions import ClientError
from loraflow_local import moto_patches
from loraflow_local.services import LocalServices
from moto.awslambda.models import LambdaFunction
from moto.sagemaker.models import FakeTrainingJob
from moto.sagemaker.responses import SageMakerResponse
from moto.sagemakerruntime.responses import SageMakerRuntimeResponse
from moto.sns.models import Subscription

pytestmark = pytest.mark.integration

Client = Callable[[str], Any]


def _run_state_machine(client: Client, definition: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    sfn = client("stepfunctions")
    role = client("iam").create_role(RoleName="sfn-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    machine = sfn.create_state_machine(name="machine", definition=json.dumps(definition), roleArn=role)
    execution = sfn.start_execution(
        stateMachineArn=machine["stateMachineArn"], name="run-1", input=json.dumps(payload)
    )["executionArn"]
    for _ in range(300):
        described: dict[str, Any] = sfn.describe_execution(executionArn=execution)
        if described["status"] != "RUNNING":
            return described
        time.sleep(0.1)
    pytest.fail("the execution did not finish in 30 s")


# 0. The version guard -------------------------------------------------------------------------------------


def test_given_other_moto_version_when_applying_then_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setattr(moto, "__version__", "9.9.9")
    with pytest.raises(RuntimeError, match=r"moto==5\.2\.5"):
        moto_patches.apply(LocalServices(state_dir=tmp_path, region="us-east-1", container_env={}))


# 1. Lambda in-process ---------------------------------------------------------------------------------------


def test_given_moto_lambda_when_patched_then_invoke_seam_keeps_its_signature(services: LocalServices):
    original = moto_patches._originals["invoke_lambda"]
    assert list(inspect.signature(original).parameters) == ["self", "event"]
    assert "self._invoke_lambda(event=body)" in inspect.getsource(LambdaFunction.invoke)
    assert LambdaFunction._invoke_lambda is moto_patches._invoke_lambda


def test_given_function_when_invoked_then_handler_runs_in_process_with_its_env_only_at_cold_start(
    deploy_function: Callable[..., str], client: Client
):
    deploy_function("env-fn", "loraflow_local_env_handler.handler", {"GREETING": "hello"})
    first = client("lambda").invoke(FunctionName="env-fn", Payload=b"{}")
    second = client("lambda").invoke(FunctionName="env-fn", Payload=b"{}")
    cold, warm = json.loads(first["Payload"].read()), json.loads(second["Payload"].read())
    assert (cold["greeting"], cold["function_at_cold_start"], cold["greeting_now"]) == (
        "hello",
        "env-fn",
        "hello",
    )
    assert (warm["greeting"], warm["greeting_now"], warm["function"]) == ("hello", None, "env-fn")
    assert 0 < warm["remaining_ms"] <= 30_000
    assert "GREETING" not in __import__("os").environ


def test_given_handler_raising_when_invoked_then_function_error_with_python_runtime_shape(
    deploy_function: Callable[..., str], client: Client
):
    deploy_function("failing-fn", "loraflow_local_test_handlers.fail")
    response = client("lambda").invoke(FunctionName="failing-fn", Payload=b'{"dataset": "0001"}')
    payload = json.loads(response["Payload"].read())
    assert response["FunctionError"]
    assert payload["errorType"] == "InvalidDatasetError"
    assert payload["errorMessage"] == "dataset 0001 has no config"
    assert isinstance(payload["stackTrace"], list) and payload["stackTrace"]


def test_given_state_machine_catching_error_type_when_handler_raises_then_catch_matches_it(
    deploy_function: Callable[..., str], client: Client
):
    arn = deploy_function("failing-task", "loraflow_local_test_handlers.fail")
    definition = {
        "StartAt": "Task",
        "States": {
            "Task": {
                "Type": "Task",
                "Resource": "arn:aws:states:::lambda:invoke",
                "Parameters": {"FunctionName": arn, "Payload.$": "$"},
                "Catch": [
                    {"ErrorEquals": ["InvalidDatasetError"], "ResultPath": "$.error", "Next": "Caught"}
                ],
                "End": True,
            },
            "Caught": {"Type": "Pass", "End": True},
        },
    }
    execution = _run_state_machine(client, definition, {"job_id": "j1"})
    assert execution["status"] == "SUCCEEDED"
    error = json.loads(execution["output"])["error"]
    assert error["Error"] == "InvalidDatasetError"
    assert json.loads(error["Cause"])["errorMessage"] == "dataset 0001 has no config"


def test_given_function_without_local_handler_when_invoked_then_function_error(
    services: LocalServices, client: Client
):
    role = client("iam").create_role(RoleName="r", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    client("lambda").create_function(
        FunctionName="orphan", Runtime="python3.12", Role=role, Handler="x.y", Code={"ZipFile": _zip()}
    )
    response = client("lambda").invoke(FunctionName="orphan", Payload=b"{}")
    assert response["FunctionError"]
    assert "no local handler" in json.loads(response["Payload"].read())["errorMessage"]


def _zip() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.py", "")
    return buffer.getvalue()


# 2. SNS → Lambda events ----------------------------------------------------------------------------------


def test_given_moto_sns_when_patched_then_subscription_publish_keeps_its_signature(services: LocalServices):
    parameters = list(inspect.signature(moto_patches._originals["sns_publish"]).parameters)
    assert parameters == inspect.getfullargspec(moto_patches._subscription_publish).args
    assert Subscription.publish is moto_patches._subscription_publish


def test_given_lambda_subscription_when_published_then_event_carries_the_real_message(
    deploy_function: Callable[..., str], client: Client, recorded_events: list[Any]
):
    arn = deploy_function("sns-recorder", "loraflow_local_test_handlers.record")
    sns = client("sns")
    topic = sns.create_topic(Name="results")["TopicArn"]
    subscription = sns.subscribe(TopicArn=topic, Protocol="lambda", Endpoint=arn)["SubscriptionArn"]
    published = sns.publish(
        TopicArn=topic,
        Message='{"inferenceId": "job-1"}',
        Subject="InferenceResult",
        MessageAttributes={"status": {"DataType": "String", "StringValue": "COMPLETED"}},
    )
    (event,) = recorded_events
    (record,) = event["Records"]
    assert record["EventSource"] == "aws:sns"
    assert record["EventSubscriptionArn"] == subscription
    message = record["Sns"]
    assert (message["TopicArn"], message["MessageId"]) == (topic, published["MessageId"])
    assert (message["Message"], message["Subject"]) == ('{"inferenceId": "job-1"}', "InferenceResult")
    assert message["MessageAttributes"] == {"status": {"Type": "String", "Value": "COMPLETED"}}


def test_given_filter_policy_when_message_does_not_match_then_function_not_invoked(
    deploy_function: Callable[..., str], client: Client, recorded_events: list[Any]
):
    arn = deploy_function("sns-filtered", "loraflow_local_test_handlers.record")
    sns = client("sns")
    topic = sns.create_topic(Name="jobs")["TopicArn"]
    sns.subscribe(
        TopicArn=topic, Protocol="lambda", Endpoint=arn, Attributes={"FilterPolicy": '{"status": ["FAILED"]}'}
    )
    for status in ("COMPLETED", "FAILED"):
        sns.publish(
            TopicArn=topic,
            Message=status,
            MessageAttributes={"status": {"DataType": "String", "StringValue": status}},
        )
    assert [event["Records"][0]["Sns"]["Message"] for event in recorded_events] == ["FAILED"]


# 3 + 4. Step Functions SageMaker integration and local training jobs --------------------------------------


def _training_task(mode: str, volume: Any = "States.StringToJson('10')") -> dict[str, Any]:
    return {
        "Type": "Task",
        "Resource": "arn:aws:states:::sagemaker:createTrainingJob.sync",
        "Parameters": {
            "TrainingJobName.$": "States.Format('loraflow-{}', $.job_id)",
            "AlgorithmSpecification": {"TrainingImage": "123.dkr.ecr/x:latest", "TrainingInputMode": "File"},
            "RoleArn": "arn:aws:iam::123456789012:role/sm",
            "HyperParameters": {"mode": mode, "base_model.$": "$.base_model"},
            "InputDataConfig": [
                {
                    "ChannelName": "dataset",
                    "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri.$": "$.dataset_s3_uri"}},
                }
            ],
            "OutputDataConfig": {"S3OutputPath": "s3://artifacts/training"},
            "ResourceConfig": {
                "InstanceType": "ml.g5.2xlarge",
                "InstanceCount": 1,
                "VolumeSizeInGB.$": volume,
            },
            "StoppingCondition": {"MaxRuntimeInSeconds": 60},
        },
        "ResultSelector": {
            "name.$": "$.TrainingJobName",
            "model.$": "$.ModelArtifacts.S3ModelArtifacts",
            "status.$": "$.TrainingJobStatus",
        },
        "ResultPath": "$.training",
        "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Caught"}],
        "End": True,
    }


def _pipeline(mode: str, **task: Any) -> dict[str, Any]:
    return {
        "StartAt": "Train",
        "States": {"Train": _training_task(mode, **task), "Caught": {"Type": "Pass", "End": True}},
    }


@pytest.fixture
def dataset(client: Client) -> dict[str, str]:
    s3 = client("s3")
    for bucket in ("datasets", "artifacts"):
        s3.create_bucket(Bucket=bucket)
    for key in ("0001/config.toml", "0001/10_dwjz/a.png", "0001/10_dwjz/a.txt", "0002/other.png"):
        s3.put_object(Bucket="datasets", Key=key, Body=key.encode())
    return {"job_id": "j1", "dataset_s3_uri": "s3://datasets/0001/", "base_model": "s3://artifacts/base/"}


def test_given_moto_sfn_when_patched_then_service_factory_seam_is_replaced(services: LocalServices):
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import state_task_factory

    assert list(inspect.signature(moto_patches._originals["state_task_service_for"]).parameters) == [
        "service_name"
    ]
    assert state_task_factory.state_task_service_for is moto_patches._state_task_service_for


def test_given_sync_training_task_when_job_succeeds_then_output_is_the_description(
    services: LocalServices, client: Client, dataset: dict[str, str]
):
    execution = _run_state_machine(client, _pipeline("succeed"), dataset)
    assert execution["status"] == "SUCCEEDED", execution
    training = json.loads(execution["output"])["training"]
    assert training == {
        "name": "loraflow-j1",
        "model": "s3://artifacts/training/loraflow-j1/output/model.tar.gz",
        "status": "Completed",
    }
    archive = client("s3").get_object(Bucket="artifacts", Key="training/loraflow-j1/output/model.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(archive["Body"].read())) as tar:
        weights = tar.extractfile("weights.txt")
        assert weights is not None
        assert weights.read() == b"trained on 10_dwjz/a.png,10_dwjz/a.txt,config.toml"


def test_given_training_job_when_run_then_process_gets_sagemaker_layout_and_env(
    services: LocalServices, client: Client, dataset: dict[str, str]
):
    _run_state_machine(client, _pipeline("succeed"), dataset)
    output = client("s3").get_object(Bucket="artifacts", Key="training/loraflow-j1/output/output.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(output["Body"].read())) as tar:
        seen_file = tar.extractfile("seen.json")
        assert seen_file is not None
        seen = json.loads(seen_file.read())
    workdir = services.state_dir / "sagemaker" / "training" / "loraflow-j1"
    assert seen["env"]["SM_CHANNEL_DATASET"] == str(workdir / "input" / "data" / "dataset")
    assert seen["env"]["SM_MODEL_DIR"] == str(workdir / "model")
    assert seen["env"]["TRAINING_JOB_NAME"] == "loraflow-j1"
    assert seen["config"]["hyperparameters.json"] == {"mode": "succeed", "base_model": "s3://artifacts/base/"}
    assert seen["config"]["inputdataconfig.json"]["dataset"]["TrainingInputMode"] == "File"
    assert seen["config"]["resourceconfig.json"]["current_host"] == "algo-1"
    assert (workdir / "training.log").read_text().strip() == "step=1 loss=0.5"


def test_given_failing_training_when_sync_task_runs_then_task_failed_with_failure_reason(
    services: LocalServices, client: Client, dataset: dict[str, str]
):
    execution = _run_state_machine(client, _pipeline("fail"), dataset)
    error = json.loads(execution["output"])["error"]
    assert error["Error"] == "States.TaskFailed"
    description = json.loads(error["Cause"])
    assert description["TrainingJobStatus"] == "Failed"
    assert json.loads(description["FailureReason"]) == {
        "code": "MODEL_LOAD_FAILED",
        "path": "",
        "message": "cannot load s3://artifacts/base/",
    }


def test_given_request_breaking_the_api_model_when_task_runs_then_sagemaker_exception(
    services: LocalServices, client: Client, dataset: dict[str, str]
):
    execution = _run_state_machine(client, _pipeline("succeed", volume="$.job_id"), dataset)
    error = json.loads(execution["output"])["error"]
    assert error["Error"] == "SageMaker.AmazonSageMakerException"
    assert "VolumeSizeInGB" in error["Cause"]
    assert client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []


def _create_job(
    client: Client, name: str, mode: str, max_runtime_s: int = 60, checkpoint_uri: str | None = None
) -> None:
    checkpoint = {"CheckpointConfig": {"S3Uri": checkpoint_uri}} if checkpoint_uri else {}
    client("sagemaker").create_training_job(
        **checkpoint,
        TrainingJobName=name,
        AlgorithmSpecification={"TrainingImage": "x", "TrainingInputMode": "File"},
        RoleArn="arn:aws:iam::123456789012:role/sm",
        HyperParameters={"mode": mode, "base_model": "none"},
        InputDataConfig=[
            {
                "ChannelName": "dataset",
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://datasets/0001/"}},
            }
        ],
        OutputDataConfig={"S3OutputPath": "s3://artifacts/training"},
        ResourceConfig={"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
        StoppingCondition={"MaxRuntimeInSeconds": max_runtime_s},
    )


def _finished(client: Client, name: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = client("sagemaker").describe_training_job(TrainingJobName=name)
        return job if job["TrainingJobStatus"] != "InProgress" else None

    return check


def test_given_moto_sagemaker_when_patched_then_job_attributes_reach_describe(services: LocalServices):
    original = moto_patches._originals["create_training_job"]
    assert "training_job_name" in inspect.signature(original).parameters
    job = FakeTrainingJob.__new__(FakeTrainingJob)
    job.__dict__.update(arn="a", failure_reason="why")  # moto derives Describe's keys from attribute names
    assert job.response_object["FailureReason"] == "why"


def test_given_training_job_when_created_then_in_progress_until_the_process_ends(
    services: LocalServices, client: Client, dataset: dict[str, str], wait_for: Callable[..., Any]
):
    _create_job(client, "job-a", "succeed")
    assert (
        client("sagemaker").describe_training_job(TrainingJobName="job-a")["TrainingJobStatus"]
        == "InProgress"
    )
    job = wait_for(_finished(client, "job-a"))
    assert job["TrainingJobStatus"] == "Completed"
    statuses = [item["Status"] for item in job["SecondaryStatusTransitions"]]
    assert statuses[-4:] == ["Downloading", "Training", "Uploading", "Completed"]
    assert job["TrainingEndTime"] >= job["TrainingStartTime"]


def test_given_training_past_max_runtime_when_running_then_killed_and_failed(
    services: LocalServices, client: Client, dataset: dict[str, str], wait_for: Callable[..., Any]
):
    _create_job(client, "job-slow", "sleep", max_runtime_s=1)
    job = wait_for(_finished(client, "job-slow"), timeout_s=15)
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Failed", "MaxRuntimeExceeded")
    assert job["FailureReason"] == "MaxRuntimeInSeconds exceeded (1 s)"


def test_given_crash_without_failure_file_when_training_then_reason_points_at_the_log(
    services: LocalServices, client: Client, dataset: dict[str, str], wait_for: Callable[..., Any]
):
    _create_job(client, "job-crash", "crash")
    job = wait_for(_finished(client, "job-crash"))
    assert job["TrainingJobStatus"] == "Failed"
    assert job["FailureReason"].startswith("AlgorithmError: exit code 3")
    assert "training.log" in job["FailureReason"]


def test_given_existing_job_name_when_created_again_then_resource_in_use(
    services: LocalServices, client: Client, dataset: dict[str, str]
):
    _create_job(client, "job-twice", "succeed")
    with pytest.raises(ClientError) as raised:
        _create_job(client, "job-twice", "succeed")
    assert raised.value.response["Error"]["Code"] == "ResourceInUse"


# 5. Async inference ----------------------------------------------------------------------------------------


@pytest.fixture
def async_endpoint(client: Client) -> dict[str, str]:
    s3, sns, sqs, sagemaker = client("s3"), client("sns"), client("sqs"), client("sagemaker")
    s3.create_bucket(Bucket="artifacts")
    queues = {}
    for outcome in ("success", "error"):
        topic = sns.create_topic(Name=f"preview-{outcome}")["TopicArn"]
        url = sqs.create_queue(QueueName=f"q-{outcome}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn, Attributes={"RawMessageDelivery": "true"})
        queues[outcome], queues[f"{outcome}_topic"] = url, topic
    sagemaker.create_model(
        ModelName="m", ExecutionRoleArn="arn:aws:iam::123456789012:role/sm", PrimaryContainer={"Image": "x"}
    )
    sagemaker.create_endpoint_config(
        EndpointConfigName="c",
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": "m",
                "InitialInstanceCount": 1,
                "InstanceType": "ml.g5.xlarge",
            }
        ],
        AsyncInferenceConfig={
            "OutputConfig": {
                "S3OutputPath": "s3://artifacts/async/responses",
                "S3FailurePath": "s3://artifacts/async/failures",
                "NotificationConfig": {
                    "SuccessTopic": queues["success_topic"],
                    "ErrorTopic": queues["error_topic"],
                },
            }
        },
    )
    sagemaker.create_endpoint(EndpointName="previews", EndpointConfigName="c")
    return queues


def _next_message(client: Client, queue_url: str, wait_for: Callable[..., Any]) -> dict[str, Any]:
    def receive() -> dict[str, Any] | None:
        messages = client("sqs").receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages", [])
        return json.loads(messages[0]["Body"]) if messages else None

    result: dict[str, Any] = wait_for(receive, timeout_s=30)
    return result


def test_given_moto_runtime_when_patched_then_async_invoke_seam_keeps_its_signature(services: LocalServices):
    assert list(inspect.signature(moto_patches._originals["invoke_endpoint_async"]).parameters) == ["self"]
    assert SageMakerRuntimeResponse.invoke_endpoint_async is moto_patches._invoke_endpoint_async


def test_given_async_endpoint_when_invoked_then_output_written_and_success_notified(
    services: LocalServices, client: Client, async_endpoint: dict[str, str], wait_for: Callable[..., Any]
):
    client("s3").put_object(Bucket="artifacts", Key="async/requests/job-1.json", Body=b'{"prompt": "dwjz"}')
    response = client("sagemaker-runtime").invoke_endpoint_async(
        EndpointName="previews",
        InputLocation="s3://artifacts/async/requests/job-1.json",
        ContentType="application/json",
        InferenceId="job-1",
    )
    assert response["InferenceId"] == "job-1"
    assert response["OutputLocation"] == "s3://artifacts/async/responses/job-1.out"
    assert response["FailureLocation"] == "s3://artifacts/async/failures/job-1-error.out"
    notification = _next_message(client, async_endpoint["success"], wait_for)
    assert {
        key: notification[key] for key in ("invocationStatus", "inferenceId", "eventSource", "eventName")
    } == {
        "invocationStatus": "Completed",
        "inferenceId": "job-1",
        "eventSource": "aws:sagemaker",
        "eventName": "InferenceResult",
    }
    assert notification["requestParameters"] == {
        "contentType": "application/json",
        "endpointName": "previews",
        "inputLocation": "s3://artifacts/async/requests/job-1.json",
    }
    assert notification["responseParameters"]["outputLocation"] == response["OutputLocation"]
    output = client("s3").get_object(Bucket="artifacts", Key="async/responses/job-1.out")["Body"].read()
    assert json.loads(output) == {"echo": {"prompt": "dwjz"}, "content_type": "application/json"}


def test_given_async_endpoint_when_its_server_starts_then_server_lines_reach_the_endpoint_log_group(
    services: LocalServices, client: Client, async_endpoint: dict[str, str], wait_for: Callable[..., Any]
):
    client("s3").put_object(Bucket="artifacts", Key="in/job-4.json", Body=b"{}")
    client("sagemaker-runtime").invoke_endpoint_async(
        EndpointName="previews", InputLocation="s3://artifacts/in/job-4.json", InferenceId="job-4"
    )
    _next_message(client, async_endpoint["success"], wait_for)

    def shipped() -> list[dict[str, Any]]:
        services.logs.flush()
        try:
            found: list[dict[str, Any]] = client("logs").filter_log_events(
                logGroupName="/aws/sagemaker/Endpoints/previews"
            )["events"]
        except client("logs").exceptions.ResourceNotFoundException:
            return []
        return found

    (event,) = wait_for(shipped)
    assert event["message"].startswith("model server listening on 127.0.0.1:")
    assert re.fullmatch(r"AllTraffic/i-[0-9a-f]{17}", event["logStreamName"])


def test_given_model_error_when_invoked_then_failure_written_and_error_notified(
    services: LocalServices, client: Client, async_endpoint: dict[str, str], wait_for: Callable[..., Any]
):
    client("s3").put_object(Bucket="artifacts", Key="in/job-2.json", Body=b'{"fail": true, "why": "no lora"}')
    client("sagemaker-runtime").invoke_endpoint_async(
        EndpointName="previews", InputLocation="s3://artifacts/in/job-2.json", InferenceId="job-2"
    )
    notification = _next_message(client, async_endpoint["error"], wait_for)
    assert (notification["invocationStatus"], notification["inferenceId"]) == ("Failed", "job-2")
    assert (
        "(500)" in notification["failureReason"]
        and "the model refused: no lora" in notification["failureReason"]
    )
    assert notification["responseParameters"] == {
        "contentType": "application/json",
        "failureLocation": "s3://artifacts/async/failures/job-2-error.out",
    }
    failure = client("s3").get_object(Bucket="artifacts", Key="async/failures/job-2-error.out")["Body"].read()
    assert json.loads(failure) == {"error": "the model refused: no lora"}


def test_given_endpoint_without_async_config_when_invoked_async_then_validation_error(
    services: LocalServices, client: Client
):
    sagemaker = client("sagemaker")
    sagemaker.create_model(
        ModelName="m", ExecutionRoleArn="arn:aws:iam::123456789012:role/sm", PrimaryContainer={"Image": "x"}
    )
    sagemaker.create_endpoint_config(
        EndpointConfigName="sync",
        ProductionVariants=[
            {"VariantName": "v", "ModelName": "m", "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}
        ],
    )
    sagemaker.create_endpoint(EndpointName="sync-endpoint", EndpointConfigName="sync")
    with pytest.raises(ClientError) as raised:
        client("sagemaker-runtime").invoke_endpoint_async(
            EndpointName="sync-endpoint", InputLocation="s3://a/b"
        )
    assert raised.value.response["Error"]["Code"] == "ValidationException"


# 6. Instance types --------------------------------------------------------------------------------------


def test_given_gpu_instance_type_moto_lacks_when_creating_config_then_accepted_and_junk_rejected(
    services: LocalServices, client: Client
):
    sagemaker = client("sagemaker")
    sagemaker.create_model(
        ModelName="m", ExecutionRoleArn="arn:aws:iam::123456789012:role/sm", PrimaryContainer={"Image": "x"}
    )
    variant = {"VariantName": "v", "ModelName": "m", "InitialInstanceCount": 1}
    sagemaker.create_endpoint_config(
        EndpointConfigName="g6", ProductionVariants=[{**variant, "InstanceType": "ml.g6.xlarge"}]
    )
    with pytest.raises(ClientError) as raised:
        sagemaker.create_endpoint_config(
            EndpointConfigName="bad", ProductionVariants=[{**variant, "InstanceType": "gpu.large"}]
        )
    assert raised.value.response["Error"]["Code"] == "ValidationException"


# Shutdown ----------------------------------------------------------------------------------------------


def test_given_running_training_and_endpoint_when_services_stop_then_interrupted_like_spot_with_checkpoint(
    services: LocalServices,
    client: Client,
    dataset: dict[str, str],
    async_endpoint: dict[str, str],
    wait_for: Callable[..., Any],
):
    uri = "s3://artifacts/checkpoints/job-long/"
    _create_job(client, "job-long", "checkpoint_on_sigterm", max_runtime_s=600, checkpoint_uri=uri)
    client("s3").put_object(Bucket="artifacts", Key="in/job-3.json", Body=b"{}")
    client("sagemaker-runtime").invoke_endpoint_async(
        EndpointName="previews", InputLocation="s3://artifacts/in/job-3.json", InferenceId="job-3"
    )
    _next_message(client, async_endpoint["success"], wait_for)
    training = services._trainings["job-long"]
    wait_for(lambda: "training until SIGTERM" in _read(training.log_path))
    server = services._endpoints["previews"]._process
    assert server is not None and server.poll() is None

    services.stop()

    assert server.poll() is not None
    assert training.process is not None and training.process.poll() is not None
    job = client("sagemaker").describe_training_job(TrainingJobName="job-long")
    # A shutdown is not the job's end: like a spot interruption, it stays in progress for a resume...
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("InProgress", "Interrupted")
    # ...with the checkpoint the trainer wrote on SIGTERM synced to S3 before the process was gone.
    saved = client("s3").get_object(Bucket="artifacts", Key="checkpoints/job-long/state/step-7/lora.pt")
    assert saved["Body"].read() == b"weights at step 7"


def _read(path: Any) -> str:
    return str(path.read_text()) if path.exists() else ""


# 7. SendTaskFailure's cause -------------------------------------------------------------------------------


def test_given_moto_sfn_responses_when_patched_then_send_task_failure_is_replaced(services: LocalServices):
    from moto.stepfunctions.responses import StepFunctionResponse

    assert StepFunctionResponse.send_task_failure is moto_patches._send_task_failure
    assert list(inspect.signature(moto_patches._originals["send_task_failure"]).parameters) == ["self"]


def test_given_waiting_task_when_failed_with_cause_then_catch_sees_error_and_cause(
    services: LocalServices, client: Client
):
    sqs = client("sqs")
    queue_url = sqs.create_queue(QueueName="tokens")["QueueUrl"]
    definition = {
        "StartAt": "Wait",
        "States": {
            "Wait": {
                "Type": "Task",
                "Resource": "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
                "Parameters": {"QueueUrl": queue_url, "MessageBody": {"token.$": "$$.Task.Token"}},
                "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Caught"}],
                "End": True,
            },
            "Caught": {"Type": "Pass", "End": True},
        },
    }
    sfn = client("stepfunctions")
    role = client("iam").create_role(RoleName="sfn-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    machine = sfn.create_state_machine(name="waiting", definition=json.dumps(definition), roleArn=role)
    execution = sfn.start_execution(stateMachineArn=machine["stateMachineArn"], name="run-1", input="{}")
    messages = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=10).get("Messages", [])
    assert messages, "the task never sent its token"

    sfn.send_task_failure(
        taskToken=json.loads(messages[0]["Body"])["token"], error="PREVIEW_FAILED", cause="model exploded"
    )

    for _ in range(100):
        described = sfn.describe_execution(executionArn=execution["executionArn"])
        if described["status"] != "RUNNING":
            break
        time.sleep(0.1)
    assert described["status"] == "SUCCEEDED"
    assert json.loads(described["output"])["error"] == {"Error": "PREVIEW_FAILED", "Cause": "model exploded"}


def test_given_cloud_released_when_moto_used_then_upstream_methods_are_back(services: LocalServices):
    from moto.stepfunctions.responses import StepFunctionResponse

    moto_patches.release()
    try:
        assert LambdaFunction._invoke_lambda is moto_patches._originals["invoke_lambda"]
        assert (
            SageMakerRuntimeResponse.invoke_endpoint_async is moto_patches._originals["invoke_endpoint_async"]
        )
        assert StepFunctionResponse.send_task_failure is moto_patches._originals["send_task_failure"]
        assert not hasattr(SageMakerResponse, "stop_training_job")
    finally:
        moto_patches.apply(services)


# 8. StopTrainingJob ----------------------------------------------------------------------------------------


def test_given_moto_sagemaker_when_patched_then_stop_training_job_is_answered_by_the_patch(
    services: LocalServices,
):
    assert SageMakerResponse.stop_training_job is moto_patches._stop_training_job  # type: ignore[attr-defined]
    job = FakeTrainingJob.__new__(FakeTrainingJob)
    job.__dict__.update(arn="a", training_job_status="Stopping", billable_time_in_seconds=3)
    assert (job.response_object["TrainingJobStatus"], job.response_object["BillableTimeInSeconds"]) == (
        "Stopping",
        3,
    )


def test_given_running_job_when_stopped_then_sigterm_lets_it_checkpoint_and_it_ends_stopped(
    services: LocalServices, client: Client, dataset: dict[str, str], wait_for: Callable[..., Any]
):
    uri = "s3://artifacts/checkpoints/job-stop/"
    _create_job(client, "job-stop", "checkpoint_on_sigterm", max_runtime_s=600, checkpoint_uri=uri)
    run = services._trainings["job-stop"]
    wait_for(lambda: "training until SIGTERM" in _read(run.log_path))

    client("sagemaker").stop_training_job(TrainingJobName="job-stop")
    stopping = client("sagemaker").describe_training_job(TrainingJobName="job-stop")
    job = wait_for(_ended(client, "job-stop"), timeout_s=15)

    assert (stopping["TrainingJobStatus"], stopping["SecondaryStatus"]) == ("Stopping", "Stopping")
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Stopped", "Stopped")
    assert run.process is not None and run.process.poll() is not None
    saved = client("s3").get_object(Bucket="artifacts", Key="checkpoints/job-stop/state/step-7/lora.pt")
    assert saved["Body"].read() == b"weights at step 7"  # the final checkpoint sync ran
    assert job["TrainingTimeInSeconds"] == job["BillableTimeInSeconds"] >= 0


def test_given_trainer_ignoring_sigterm_when_stopped_then_killed_after_the_grace_period(
    services: LocalServices, client: Client, dataset: dict[str, str], wait_for: Callable[..., Any]
):
    services.stop_grace_s = 1.0
    _create_job(client, "job-stubborn", "stubborn", max_runtime_s=600)
    run = services._trainings["job-stubborn"]
    wait_for(lambda: "ignoring SIGTERM" in _read(run.log_path))

    asked = time.monotonic()
    client("sagemaker").stop_training_job(TrainingJobName="job-stubborn")
    job = wait_for(_ended(client, "job-stubborn"), timeout_s=15, interval_s=0.05)
    took = time.monotonic() - asked

    assert job["TrainingJobStatus"] == "Stopped"
    assert 1.0 <= took < 5.0
    assert run.process is not None and run.process.returncode == -signal.SIGKILL


def test_given_ended_or_unknown_job_when_stopped_then_validation_error_or_not_found(
    services: LocalServices, client: Client, dataset: dict[str, str], wait_for: Callable[..., Any]
):
    _create_job(client, "job-done", "succeed")
    wait_for(_finished(client, "job-done"))

    with pytest.raises(ClientError) as ended:
        client("sagemaker").stop_training_job(TrainingJobName="job-done")
    with pytest.raises(ClientError) as unknown:
        client("sagemaker").stop_training_job(TrainingJobName="no-such-job")

    assert ended.value.response["Error"]["Code"] == "ValidationException"
    assert "Completed" in ended.value.response["Error"]["Message"]
    assert unknown.value.response["Error"]["Code"] == "ResourceNotFound"


def test_given_moto_sfn_interpreter_when_patched_then_sync_wait_seam_ends_on_stop(services: LocalServices):
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
        state_task_service_callback as callback,
    )
    from moto.stepfunctions.parser.asl.eval.environment import Environment

    StateTaskServiceCallback = callback.StateTaskServiceCallback

    # The SageMaker service overrides `_eval_sync`, whose loop ends once StopExecution has set the state.
    parameters = list(inspect.signature(StateTaskServiceCallback._eval_sync).parameters)
    assert parameters == [
        "self",
        "env",
        "sync_resolver",
        "timeout_seconds",
        "callback_endpoint",
        "heartbeat_endpoint",
    ]
    assert "while env.is_running():" in inspect.getsource(StateTaskServiceCallback._eval_sync)
    assert "ProgramStopped(" in inspect.getsource(Environment.set_stop)


def test_given_execution_waiting_on_sync_training_when_execution_stopped_then_training_job_stopped(
    services: LocalServices, client: Client, dataset: dict[str, str], wait_for: Callable[..., Any]
):
    sfn = client("stepfunctions")
    role = client("iam").create_role(RoleName="sfn-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    machine = sfn.create_state_machine(name="m", definition=json.dumps(_pipeline("sleep")), roleArn=role)
    execution = sfn.start_execution(
        stateMachineArn=machine["stateMachineArn"], name="run-1", input=json.dumps(dataset)
    )["executionArn"]
    run = wait_for(lambda: services._trainings.get("loraflow-j1"))
    wait_for(lambda: run.process is not None and run.process.poll() is None)

    sfn.stop_execution(executionArn=execution, error="Cancelled", cause="asked by the user")
    stopped_at = time.monotonic()
    wait_for(lambda: run.process.poll() is not None, timeout_s=10, interval_s=0.05)
    took = time.monotonic() - stopped_at
    job = wait_for(_ended(client, "loraflow-j1"), timeout_s=10)

    assert took < 5.0
    assert (job["TrainingJobStatus"], job["SecondaryStatus"]) == ("Stopped", "Stopped")
    assert sfn.describe_execution(executionArn=execution)["status"] == "ABORTED"


def test_given_sync_training_when_job_completes_then_output_has_training_and_billable_seconds(
    services: LocalServices, client: Client, dataset: dict[str, str]
):
    definition = _pipeline("succeed")
    definition["States"]["Train"]["ResultSelector"] = {
        "seconds.$": "$.TrainingTimeInSeconds",
        "billable.$": "$.BillableTimeInSeconds",
        "started.$": "$.TrainingStartTime",
        "ended.$": "$.TrainingEndTime",
    }

    execution = _run_state_machine(client, definition, dataset)

    assert execution["status"] == "SUCCEEDED", execution
    training = json.loads(execution["output"])["training"]
    assert training["seconds"] == training["billable"]  # on demand (and spot, locally): all time is billed
    assert training["seconds"] == math.ceil((training["ended"] - training["started"]) / 1000)


def test_given_job_in_progress_when_described_then_no_end_time_nor_seconds_yet(
    services: LocalServices, client: Client, dataset: dict[str, str], wait_for: Callable[..., Any]
):
    _create_job(client, "job-busy", "checkpoint_on_sigterm", max_runtime_s=600)
    run = services._trainings["job-busy"]
    wait_for(lambda: "training until SIGTERM" in _read(run.log_path))

    job = client("sagemaker").describe_training_job(TrainingJobName="job-busy")

    assert job["TrainingJobStatus"] == "InProgress"
    assert "TrainingStartTime" in job
    assert not {"TrainingEndTime", "TrainingTimeInSeconds", "BillableTimeInSeconds"} & set(job)


def _ended(client: Client, name: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        job: dict[str, Any] = client("sagemaker").describe_training_job(TrainingJobName=name)
        return job if job["TrainingJobStatus"] not in ("InProgress", "Stopping") else None

    return check
