"""Every change loraflow makes to moto, in one place. Each has a test in tests/integration/localcloud.

1. Lambda runs in-process: `LambdaFunction._invoke_lambda` (the one seam of API, state machine, S3, SNS
   and SQS invocations) calls the registered handler instead of a Docker container.
2. SNS → Lambda events carry the real topic ARN, message id, subject, timestamp and message attributes
   (moto sends a fixed placeholder event).
3. Step Functions gains the optimised SageMaker integration (`createTrainingJob[.sync]`) at the
   interpreter's service-factory seam.
4. SageMaker CreateTrainingJob starts a local training run (moto marks jobs Completed at once and runs
   nothing): InProgress, then Completed or Failed with the failure file as FailureReason; once it ends,
   DescribeTrainingJob has TrainingStartTime/TrainingEndTime and TrainingTimeInSeconds/BillableTimeInSeconds.
5. SageMaker Runtime InvokeEndpointAsync hands the request to the local async endpoint (moto returns
   canned locations and ignores the endpoint's AsyncInferenceConfig).
6. SageMaker endpoint configs accept any `ml.*` instance type (moto's fixed list lacks g5/g6 GPUs;
   locally the type means nothing).
7. Step Functions SendTaskFailure keeps its `cause`.
8. SageMaker StopTrainingJob (moto answers HTTP 500): Stopping, SIGTERM to the local run, then Stopped.

moto is pinned: the patched names are private and move between releases.
"""

from __future__ import annotations

import datetime
import json
import math
import threading
import uuid
from typing import Any, Final, cast

import moto
from moto.awslambda.models import LambdaFunction, lambda_backends
from moto.core.common_types import TYPE_RESPONSE
from moto.core.responses import EmptyResult
from moto.core.utils import utcnow
from moto.sagemaker.exceptions import ResourceInUseException, ResourceNotFound, ValidationError
from moto.sagemaker.models import (
    FakeEndpointConfig,
    FakeTrainingJob,
    SageMakerModelBackend,
    sagemaker_backends,
)
from moto.sagemaker.responses import SageMakerResponse
from moto.sagemakerruntime.responses import SageMakerRuntimeResponse
from moto.sns.models import Subscription
from moto.stepfunctions.parser.asl.component.state.exec.state_task import state_task_factory
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service import (
    StateTaskService,
)
from moto.stepfunctions.parser.models import StepFunctionsParserBackend
from moto.stepfunctions.responses import StepFunctionResponse

from loraflow_local.lambda_runtime import error_payload
from loraflow_local.sagemaker_async import AsyncEndpointConfig, AsyncRequest
from loraflow_local.sagemaker_training import TrainingJobSpec, TrainingStatus
from loraflow_local.services import LocalServices
from loraflow_local.sfn_sagemaker import StateTaskServiceSageMaker

EXPECTED_MOTO_VERSION: Final[str] = "5.2.5"

_originals: dict[str, Any] = {}  # kept after release: a call already inside a patch still finds them
_installed = False
_bound: LocalServices | None = None
_apply_lock = threading.Lock()


class LocalCloudNotRunningError(RuntimeError):
    pass


def apply(services: LocalServices) -> None:
    """Install the patches (once per process) and route them to `services`."""
    global _bound, _installed
    if moto.__version__ != EXPECTED_MOTO_VERSION:
        raise RuntimeError(
            f"loraflow's local cloud patches moto {EXPECTED_MOTO_VERSION} internals, but moto "
            f"{moto.__version__} is installed: install moto=={EXPECTED_MOTO_VERSION} or re-check the patches"
        )
    with _apply_lock:
        if not _installed:
            _install()
            _installed = True
        _bound = services


def release() -> None:
    """Unbind the services and put moto's originals back: moto used later in this process is upstream moto."""
    global _bound, _installed
    with _apply_lock:
        _bound = None
        if _installed:
            _uninstall()
            _installed = False


def _services() -> LocalServices:
    if _bound is None:
        raise LocalCloudNotRunningError("a patched moto service was called while no local cloud is running")
    return _bound


def _install() -> None:
    _originals["invoke_lambda"] = LambdaFunction._invoke_lambda
    LambdaFunction._invoke_lambda = _invoke_lambda  # type: ignore[method-assign]
    _originals["sns_publish"] = Subscription.publish
    Subscription.publish = _subscription_publish  # type: ignore[method-assign]
    _originals["state_task_service_for"] = state_task_factory.state_task_service_for
    state_task_factory.state_task_service_for = _state_task_service_for
    _originals["create_training_job"] = SageMakerModelBackend.create_training_job
    SageMakerModelBackend.create_training_job = _create_training_job  # type: ignore[method-assign,assignment]
    _originals["invoke_endpoint_async"] = SageMakerRuntimeResponse.invoke_endpoint_async
    SageMakerRuntimeResponse.invoke_endpoint_async = _invoke_endpoint_async  # type: ignore[method-assign]
    _originals["validate_instance_type"] = FakeEndpointConfig.validate_instance_type
    FakeEndpointConfig.validate_instance_type = _validate_instance_type  # type: ignore[method-assign]
    _originals["send_task_failure"] = StepFunctionResponse.send_task_failure
    StepFunctionResponse.send_task_failure = _send_task_failure  # type: ignore[method-assign]
    SageMakerResponse.stop_training_job = _stop_training_job  # type: ignore[attr-defined]


def _uninstall() -> None:
    LambdaFunction._invoke_lambda = _originals["invoke_lambda"]  # type: ignore[method-assign]
    Subscription.publish = _originals["sns_publish"]  # type: ignore[method-assign]
    state_task_factory.state_task_service_for = _originals["state_task_service_for"]
    SageMakerModelBackend.create_training_job = _originals["create_training_job"]  # type: ignore[method-assign]
    SageMakerRuntimeResponse.invoke_endpoint_async = _originals["invoke_endpoint_async"]  # type: ignore[method-assign]
    FakeEndpointConfig.validate_instance_type = _originals["validate_instance_type"]  # type: ignore[method-assign]
    StepFunctionResponse.send_task_failure = _originals["send_task_failure"]  # type: ignore[method-assign]
    del SageMakerResponse.stop_training_job  # type: ignore[attr-defined]


# 1. Lambda ---------------------------------------------------------------------------------------------


def _invoke_lambda(self: LambdaFunction, event: Any = None) -> tuple[str, bool, str]:
    if isinstance(event, str | bytes):
        event = json.loads(event or "{}")
    registry = _services().lambdas
    try:
        registry.spec(self.function_name)
    except KeyError as exc:
        return json.dumps(error_payload(exc)), True, ""
    result = registry.invoke(self.function_name, {} if event is None else event)
    return result.payload, result.errored, ""


# 2. SNS → Lambda event -----------------------------------------------------------------------------------


def _subscription_publish(
    self: Subscription,
    message: str,
    message_id: str,
    subject: str | None = None,
    message_attributes: dict[str, Any] | None = None,
    group_id: str | None = None,
    deduplication_id: str | None = None,
    message_structure: str | None = None,
) -> None:
    if self.protocol != "lambda":
        original = _originals["sns_publish"]
        extra = (group_id, deduplication_id, message_structure)
        original(self, message, message_id, subject, message_attributes, *extra)
        return
    attributes = message_attributes or {}
    matcher = self._filter_policy_matcher
    if matcher is not None and not matcher.matches(attributes, message):
        return
    if message_structure == "json":
        message = self._parse_message_structure(message, self.protocol)
    event = sns_lambda_event(self.arn, self.topic.arn, message, message_id, subject, attributes)
    _, region, account, name, qualifier = _split_function_arn(self.endpoint)
    function = lambda_backends[account][region].get_function(name, qualifier)
    function.invoke(json.dumps(event), {}, {})


def sns_lambda_event(
    subscription_arn: str,
    topic_arn: str,
    message: str,
    message_id: str,
    subject: str | None,
    attributes: dict[str, Any],
) -> dict[str, Any]:
    """The event SNS sends a subscribed Lambda function (signature fields are placeholders)."""
    now = datetime.datetime.now(datetime.UTC)
    record = {
        "EventVersion": "1.0",
        "EventSubscriptionArn": subscription_arn,
        "EventSource": "aws:sns",
        "Sns": {
            "SignatureVersion": "1",
            "Timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
            "Signature": "EXAMPLE",
            "SigningCertUrl": "EXAMPLE",
            "MessageId": message_id,
            "Message": message,
            "MessageAttributes": {
                key: {"Type": value["Type"], "Value": value["Value"]} for key, value in attributes.items()
            },
            "Type": "Notification",
            "UnsubscribeUrl": "EXAMPLE",
            "TopicArn": topic_arn,
            "Subject": subject,
        },
    }
    return {"Records": [record]}


def _split_function_arn(arn: str) -> tuple[str, str, str, str, str | None]:
    parts = arn.split(":")  # arn:aws:lambda:<region>:<account>:function:<name>[:<qualifier>]
    if len(parts) not in (7, 8) or parts[5] != "function":
        raise ValueError(f"not a Lambda function ARN: {arn}")
    return parts[1], parts[3], parts[4], parts[6], parts[7] if len(parts) == 8 else None


# 3. Step Functions SageMaker integration ------------------------------------------------------------------


def _state_task_service_for(service_name: str) -> StateTaskService:
    if service_name == "sagemaker":
        return StateTaskServiceSageMaker()
    service: StateTaskService = _originals["state_task_service_for"](service_name)
    return service


# 4. SageMaker training jobs ---------------------------------------------------------------------------------


def _create_training_job(self: SageMakerModelBackend, training_job_name: str, **kwargs: Any) -> Any:
    if training_job_name in self.training_jobs:  # moto would silently replace the job
        arn = FakeTrainingJob.arn_formatter(training_job_name, self.account_id, self.region_name)
        raise ResourceInUseException(
            "Training job names must be unique within an AWS account and region, "
            f"and a training job with this name already exists ({arn})"
        )
    services = _services()  # before creating: no job should exist that nothing will run
    create = _originals["create_training_job"]
    job: Any = create(self, training_job_name=training_job_name, **kwargs)
    spec = TrainingJobSpec.from_request(job.response_object)
    job.training_start_time = job.training_end_time = None  # moto sets both to the creation time
    _record_status(job, TrainingStatus("InProgress", "Starting"))
    services.launch_training(spec, on_status=lambda status: _record_status(job, status))
    return job


def _record_status(job: Any, status: TrainingStatus) -> None:
    """Apply a status change to moto's FakeTrainingJob; DescribeTrainingJob reports its attributes."""
    now = utcnow()
    transitions = job.secondary_status_transitions
    if transitions and transitions[-1]["Status"] != status.secondary_status:
        transitions[-1]["EndTime"] = now
    if not transitions or transitions[-1]["Status"] != status.secondary_status:
        transitions.append(
            {"Status": status.secondary_status, "StartTime": now, "StatusMessage": status.status}
        )
    job.training_job_status = status.status
    job.secondary_status = status.secondary_status
    job.last_modified_time = now
    if status.failure_reason is not None:
        job.failure_reason = status.failure_reason
    if status.secondary_status == "Downloading" and job.training_start_time is None:
        job.training_start_time = now  # SageMaker: the instance is ready; billing starts here
    if status.status in _ENDED:
        _record_end(job, now)


_ENDED: Final = frozenset({"Completed", "Failed", "Stopped"})


def _record_end(job: Any, now: datetime.datetime) -> None:
    """SageMaker bills TrainingStartTime to TrainingEndTime; managed spot bills less, but locally spot runs
    as on demand, so BillableTimeInSeconds equals TrainingTimeInSeconds."""
    job.training_end_time = now
    started = job.training_start_time or now
    seconds = max(0, math.ceil((now - started).total_seconds()))
    job.training_time_in_seconds = job.billable_time_in_seconds = seconds


# 5. SageMaker async inference ----------------------------------------------------------------------------


def _invoke_endpoint_async(self: SageMakerRuntimeResponse) -> TYPE_RESPONSE:
    endpoint_name = self.path.split("/")[2]
    backend = sagemaker_backends[self.current_account][self.region]
    config = _endpoint_async_config(backend, endpoint_name)
    endpoint = _services().endpoint(endpoint_name, lambda: config)
    headers = self.headers
    request = AsyncRequest(
        inference_id=headers.get("X-Amzn-SageMaker-Inference-Id") or str(uuid.uuid4()),
        input_location=headers["X-Amzn-SageMaker-InputLocation"],
        content_type=headers.get("X-Amzn-SageMaker-Content-Type") or "application/octet-stream",
        accept=headers.get("X-Amzn-SageMaker-Accept") or "*/*",
        invocation_timeout_s=int(headers.get("X-Amzn-SageMaker-InvocationTimeoutSeconds") or 900),
    )
    accepted = endpoint.submit(request)
    response_headers = {"X-Amzn-SageMaker-OutputLocation": accepted.output_location}
    if accepted.failure_location is not None:
        response_headers["X-Amzn-SageMaker-FailureLocation"] = accepted.failure_location
    return 202, response_headers, json.dumps({"InferenceId": accepted.inference_id})


def _endpoint_async_config(backend: SageMakerModelBackend, endpoint_name: str) -> AsyncEndpointConfig:
    endpoint = backend.describe_endpoint(endpoint_name)  # raises ValidationException when unknown
    config = backend.describe_endpoint_config(endpoint["EndpointConfigName"])
    async_config = config.get("AsyncInferenceConfig")
    if not async_config:
        raise ValidationError(f"Endpoint {endpoint_name} is not an asynchronous inference endpoint")
    variant = config["ProductionVariants"][0]
    model = backend.describe_model(variant["ModelName"]).response_object
    environment = (model.get("PrimaryContainer") or {}).get("Environment") or {}
    return AsyncEndpointConfig.from_api(async_config, environment, variant["VariantName"])


# 6. Instance types -----------------------------------------------------------------------------------------


def _validate_instance_type(self: FakeEndpointConfig, instance_type: str) -> None:
    if not instance_type.startswith("ml."):
        raise ValidationError(f"Value '{instance_type}' at 'instanceType' failed to satisfy constraint: ml.*")


# 7. SendTaskFailure's cause ---------------------------------------------------------------------------------


def _send_task_failure(self: StepFunctionResponse) -> Any:
    """moto's response handler drops `cause`; the executing backend takes it. Without it a failed preview's
    reason never reaches the job (the callback sends it as the cause)."""
    # With execute_state_machine on, the backend is the interpreter's, which accepts a cause.
    backend = cast(StepFunctionsParserBackend, self.stepfunction_backend)
    backend.send_task_failure(
        self._get_param("taskToken"), error=self._get_param("error"), cause=self._get_param("cause")
    )
    return EmptyResult()


# 8. StopTrainingJob -----------------------------------------------------------------------------------------


def _stop_training_job(self: SageMakerResponse) -> Any:
    """SageMaker: Stopping, SIGTERM to the algorithm, SIGKILL 120 s later (locally: the services' grace),
    then Stopped. An unknown job is ResourceNotFound; one that has ended is a ValidationException."""
    name = self._get_param("TrainingJobName")
    job = self.sagemaker_backend.training_jobs.get(name)
    if job is None:
        arn = FakeTrainingJob.arn_formatter(name, self.current_account, self.region)
        raise ResourceNotFound(f"Requested resource not found: {arn}")
    if job.training_job_status == "Stopping":
        return EmptyResult()  # a repeated request while it stops changes nothing
    if job.training_job_status != "InProgress":
        raise ValidationError(
            f"The request was rejected because the training job is in status {job.training_job_status}."
        )
    _record_status(job, TrainingStatus("Stopping", "Stopping"))
    if not _services().stop_training(name):  # no local run left (interrupted by a shutdown): ends now
        _record_status(job, TrainingStatus("Stopped", "Stopped"))
    return EmptyResult()
