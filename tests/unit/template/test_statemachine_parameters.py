"""Each task's Parameters evaluated by a real ASL interpreter (moto's), against the state it sees on the way.

moto cannot run the tasks themselves (no SageMaker .sync, Lambda needs Docker), so every task's
Parameters is run as a Pass state: JSONPath, intrinsic functions and substituted numbers are
evaluated exactly as Step Functions would, and the resulting payloads are checked against the contract.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.session
import pytest
from botocore.validate import ParamValidator
from loraflow_pipeline.base_model_inputs import channel
from loraflow_pipeline.events import ACTION_ADAPTER
from loraflow_shared.base_models import BASE_MODEL_CHANNEL, DATASET_CHANNEL
from loraflow_shared.jobs.model import checkpoint_prefix, training_job_name
from loraflow_shared.jobs.preview_timing import MIN_PREVIEW_TIMEOUT_S
from moto import mock_aws
from template_helpers import ASL_PATH, substitute

EXECUTION_INPUT = {
    "job_id": "ds-0123abcd",
    "attempt": 2,
    "dataset": "cats",
    "dataset_s3_uri": "s3://datasets/cats/",
    "config_file": "config.toml",
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
MIRROR = "s3://artifacts/base-models/hub/stable-diffusion-v1-5/stable-diffusion-v1-5@" + "a" * 40 + "/"
# What MarkTraining / PlanTrainingRetry return: the name and the instance type of the job's compute class,
# the channels (here with the stack's mirror of the base model) and the base model the trainer loads.
RUN = {
    "training_job_name": training_job_name("ds-0123abcd", 2, 3),
    "instance_type": "ml.g6e.2xlarge",
    "channels": [channel(DATASET_CHANNEL, "s3://datasets/cats/"), channel(BASE_MODEL_CHANNEL, MIRROR)],
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5@" + "a" * 40,
    "base_model_mirror": "",
}
SETTINGS = {"spot": True, "stopping_condition": {"MaxRuntimeInSeconds": 14400}, "preview_timeout_s": 3600}
TRAINING = {  # the .sync task's output: DescribeTrainingJob
    "TrainingJobName": RUN["training_job_name"],
    "ModelArtifacts": {"S3ModelArtifacts": "s3://artifacts/training/m.tar.gz"},
    "ResourceConfig": {"InstanceType": "ml.g6e.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 50},
    "TrainingTimeInSeconds": 600,
    "BillableTimeInSeconds": 240,
    "EnableManagedSpotTraining": True,
}
RECORDED = {"lora_s3_uri": "s3://artifacts/jobs/ds-0123abcd/lora/pytorch_lora_weights.safetensors"}
PREVIEWS = {"job_id": "ds-0123abcd", "previews": [{"prompt": "a cat", "s3_uri": "s3://artifacts/p/0.png"}]}
ERROR = {"Error": "States.TaskFailed", "Cause": "boom"}

# What each task's state holds when it runs (execution input plus the results written before it).
BEFORE_TRAINING = {**EXECUTION_INPUT, "settings": SETTINGS, "run": RUN}
STATE_SEEN_BY: dict[str, dict[str, Any]] = {
    "MarkTraining": {**EXECUTION_INPUT, "settings": SETTINGS},
    "Train": BEFORE_TRAINING,
    "PlanTrainingRetry": {**BEFORE_TRAINING, "error": ERROR},
    "RecordTraining": {**BEFORE_TRAINING, "training": TRAINING},
    "GeneratePreviews": {**BEFORE_TRAINING, "training": TRAINING, "recorded": RECORDED},
    "Complete": {**BEFORE_TRAINING, "training": TRAINING, "recorded": RECORDED, "previews": PREVIEWS},
    "MarkFailed": {**BEFORE_TRAINING, "error": ERROR},
}
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:pipeline"
JOB = {"job_id": "ds-0123abcd", "attempt": 2}


@pytest.fixture(scope="module")
def stepfunctions() -> Iterator[Any]:
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        yield boto3.client(
            "stepfunctions", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )


def _substituted(use_spot: str) -> dict[str, Any]:
    values = {
        "PipelineTasksFunctionArn": FUNCTION_ARN,
        "TrainingImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/loraflow-training:abc1234",
        "SageMakerRoleArn": "arn:aws:iam::123456789012:role/sagemaker",
        "ArtifactsBucket": "artifacts",
        "TrainingVolumeSizeGB": "50",
        "MaxTrainingSeconds": "14400",
        "UseSpotTraining": use_spot,
        "SpotWaitSeconds": "3600",
        "PreviewTimeoutSeconds": str(MIN_PREVIEW_TIMEOUT_S),
        "HuggingFaceTokenSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf-AbCdEf",
    }
    return substitute(ASL_PATH.read_text(encoding="utf-8"), values)


@pytest.fixture(scope="module")
def definition() -> dict[str, Any]:
    return _substituted(use_spot="true")


def _evaluate(client: Any, parameters: dict[str, Any], state: dict[str, Any], name: str) -> Any:
    # A Pass state has no task token, and the start time varies: the execution name stands in for both.
    text = json.dumps(parameters)
    for context_path in ('"$$.Task.Token"', '"$$.Execution.StartTime"'):
        text = text.replace(context_path, '"$$.Execution.Name"')
    machine = {"StartAt": "P", "States": {"P": {"Type": "Pass", "Parameters": json.loads(text), "End": True}}}
    return _execute(client, machine, state, name)


def _execute(client: Any, machine: dict[str, Any], state: dict[str, Any], name: str) -> Any:
    arn = client.create_state_machine(
        name=f"eval-{name}", definition=json.dumps(machine), roleArn="arn:aws:iam::123456789012:role/sfn"
    )["stateMachineArn"]
    execution = client.start_execution(stateMachineArn=arn, name="token-1", input=json.dumps(state))
    for _ in range(100):
        described = client.describe_execution(executionArn=execution["executionArn"])
        if described["status"] != "RUNNING":
            break
        time.sleep(0.02)
    assert described["status"] == "SUCCEEDED", described
    return json.loads(described["output"])


@pytest.mark.parametrize(
    ("task", "payload"),
    [
        ("MarkTraining", {"action": "mark_training", **JOB}),
        (
            "PlanTrainingRetry",
            {"action": "plan_training_retry", **JOB, "error": ERROR, "execution_started_at": "token-1"},
        ),
        ("RecordTraining", {"action": "record_training", **JOB, "training_job": TRAINING}),
        ("GeneratePreviews", {"action": "request_previews", **JOB, "task_token": "token-1", **RECORDED}),
        ("Complete", {"action": "complete", **JOB, "previews": PREVIEWS}),
        ("MarkFailed", {"action": "fail", **JOB, "error": ERROR}),
    ],
)
def test_given_state_on_the_way_when_lambda_task_parameters_evaluated_then_payload_matches_contract(
    stepfunctions: Any, definition: dict[str, Any], task: str, payload: dict[str, Any]
) -> None:
    parameters = definition["States"][task]["Parameters"]

    evaluated = _evaluate(stepfunctions, parameters, STATE_SEEN_BY[task], task)

    assert evaluated == {"FunctionName": FUNCTION_ARN, "Payload": payload}
    # The pipeline function accepts exactly what the state machine sends.
    assert ACTION_ADAPTER.validate_python(evaluated["Payload"]).action == payload["action"]


def _training_request(client: Any, definition: dict[str, Any], name: str) -> dict[str, Any]:
    """Run the real Settings and capacity states, then evaluate Train's Parameters (as a Pass) on what
    they wrote (MarkTraining, between them, only adds `run`)."""
    states = {n: definition["States"][n] for n in ("SpotOrOnDemand", "SpotStoppingCondition")}
    settings = {**definition["States"]["Settings"], "Next": "SpotOrOnDemand"}
    train = {"Type": "Pass", "Parameters": definition["States"]["Train"]["Parameters"], "End": True}
    machine = {"StartAt": "Settings", "States": {"Settings": settings, **states, "Train": train}}
    state = {**EXECUTION_INPUT, "run": RUN}
    request: dict[str, Any] = _execute(client, machine, state, name)
    return request


def test_given_execution_input_when_training_parameters_evaluated_then_valid_create_training_job_request(
    stepfunctions: Any, definition: dict[str, Any]
) -> None:
    request = _training_request(stepfunctions, definition, "Train")

    # The name MarkTraining / PlanTrainingRetry allocated (matching the IAM policy's `loraflow-*`).
    assert request["TrainingJobName"] == training_job_name("ds-0123abcd", 2, 3)
    assert request["Environment"] == {
        "HF_TOKEN_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf-AbCdEf"
    }
    assert request["ResourceConfig"] == {
        "InstanceType": "ml.g6e.2xlarge",  # the run's: the family decides it, not one stack-wide type
        "InstanceCount": 1,
        "VolumeSizeInGB": 50,
    }
    assert request["HyperParameters"] == {
        "config_file": "config.toml",
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5@" + "a" * 40,  # pinned by ingest
        "base_model_mirror": "",
        "job_id": "ds-0123abcd",
    }
    assert [c["ChannelName"] for c in request["InputDataConfig"]] == ["dataset", "base_model"]
    assert request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == "s3://datasets/cats/"
    assert request["InputDataConfig"][1]["DataSource"]["S3DataSource"]["S3Uri"] == MIRROR
    assert request["OutputDataConfig"] == {"S3OutputPath": "s3://artifacts/training"}
    # Botocore's model of CreateTrainingJob accepts it as is (what SageMaker's API would check first).
    report = ParamValidator().validate(request, _create_training_job_shape())
    assert not report.has_errors(), report.generate_report()


def test_given_spot_training_when_parameters_evaluated_then_spot_with_wait_beyond_runtime_and_checkpoints(
    stepfunctions: Any, definition: dict[str, Any]
) -> None:
    request = _training_request(stepfunctions, definition, "TrainSpot")

    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {
        "MaxRuntimeInSeconds": 14400,
        "MaxWaitTimeInSeconds": 14400 + 3600,
    }
    # The prefix the API reads progress.json from, and SageMaker restores after an interruption.
    assert request["CheckpointConfig"] == {
        "S3Uri": f"s3://artifacts/{checkpoint_prefix('ds-0123abcd')}",
        "LocalPath": "/opt/ml/checkpoints",
    }


def test_given_on_demand_training_when_parameters_evaluated_then_no_spot_wait_but_still_checkpoints(
    stepfunctions: Any,
) -> None:
    request = _training_request(stepfunctions, _substituted(use_spot="false"), "TrainOnDemand")

    # SageMaker refuses MaxWaitTimeInSeconds unless EnableManagedSpotTraining is true.
    assert request["EnableManagedSpotTraining"] is False
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 14400}
    assert request["CheckpointConfig"]["S3Uri"] == f"s3://artifacts/{checkpoint_prefix('ds-0123abcd')}"


def _create_training_job_shape() -> Any:
    return (
        botocore.session.get_session()
        .get_service_model("sagemaker")
        .operation_model("CreateTrainingJob")
        .input_shape
    )


def test_given_settings_state_when_run_then_preview_timeout_is_a_number_for_timeout_seconds_path(
    stepfunctions: Any, definition: dict[str, Any]
) -> None:
    settings = {**definition["States"]["Settings"], "End": True}
    settings.pop("Next")
    machine = {"StartAt": "Settings", "States": {"Settings": settings}}

    output = _execute(stepfunctions, machine, EXECUTION_INPUT, "Settings")

    assert output["settings"]["preview_timeout_s"] == MIN_PREVIEW_TIMEOUT_S
    assert definition["States"]["GeneratePreviews"]["TimeoutSecondsPath"] == "$.settings.preview_timeout_s"
