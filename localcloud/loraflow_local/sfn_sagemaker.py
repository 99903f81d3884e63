"""Step Functions' optimised SageMaker integration (`arn:aws:states:::sagemaker:createTrainingJob[.sync]`).

moto's interpreter (ported from LocalStack) lists sagemaker as unsupported; this follows the shape of its
Glue integration. Behaviour copied from AWS:
- parameters are validated against the CreateTrainingJob API model; a rejected call fails the task with
  `SageMaker.AmazonSageMakerException` and the service's message as the cause;
- `.sync` polls DescribeTrainingJob; `Completed` outputs the description; `Failed`/`Stopped` fail the task
  with `States.TaskFailed` and the description (with `FailureReason`) as JSON in the cause;
- stopping the execution while it waits on `.sync` stops the training job (StopTrainingJob: the `.sync`
  pattern's generated IAM policy grants `sagemaker:StopTrainingJob` for this). The interpreter's seam:
  `StopExecution` sets the program state of the execution and of its frames to `ProgramStopped`, and
  `_eval_sync`'s polling loop ends when the state is no longer running.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Callable
from typing import Any, Final, cast

import botocore.session
from botocore.exceptions import ClientError
from botocore.model import StructureShape
from botocore.validate import ParamValidator
from moto.stepfunctions.parser.api import HistoryEventType, TaskFailedEventDetails
from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
    FailureEvent,
    FailureEventException,
)
from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
    StatesErrorNameType,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task.credentials import StateCredentials
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
    state_task_service_callback as callback_base,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import (
    ResourceCondition,
    ResourceRuntimePart,
)
from moto.stepfunctions.parser.asl.eval.callback.callback import CallbackEndpoint, HeartbeatEndpoint
from moto.stepfunctions.parser.asl.eval.environment import Environment
from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails
from moto.stepfunctions.parser.asl.eval.program_state import ProgramStopped
from moto.stepfunctions.parser.asl.utils.boto_client import boto_client_for
from moto.stepfunctions.parser.asl.utils.encoding import to_json_str

LOG = logging.getLogger(__name__)

SERVICE_ERROR: Final[str] = "SageMaker.AmazonSageMakerException"
_SUPPORTED_ACTIONS: Final[dict[str, str]] = {"createtrainingjob": "CreateTrainingJob"}
_TERMINAL_FAILURES: Final[frozenset[str]] = frozenset({"Failed", "Stopped"})


@functools.cache
def _input_shape(operation: str) -> StructureShape:
    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model(operation).input_shape
    assert isinstance(shape, StructureShape)
    return shape


class _RejectedRequestError(Exception):
    """The request does not match the API model (botocore would raise ParamValidationError)."""


def _json_ready(value: Any) -> Any:
    """Step Functions outputs timestamps of SageMaker descriptions as epoch milliseconds."""
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value


class StateTaskServiceSageMaker(callback_base.StateTaskServiceCallback):
    def __init__(self) -> None:
        # WaitForTaskToken is listed only because moto's callback base dereferences the task's callback
        # endpoint unconditionally after a `.sync` (None without it); `.waitForTaskToken` itself is refused
        # below, as AWS refuses it for SageMaker.
        patterns = cast(set[ResourceCondition], {ResourceCondition.Sync, ResourceCondition.WaitForTaskToken})
        super().__init__(supported_integration_patterns=patterns)

    def _assert_integration_pattern_is_supported(self) -> None:
        if self.resource.condition != ResourceCondition.Sync:
            condition, arn = self.resource.condition, self.resource.resource_arn
            raise RuntimeError(f"Unsupported {condition} callback procedure in resource {arn}")

    def _get_supported_parameters(self) -> set[str] | None:
        operation = _SUPPORTED_ACTIONS.get(self.resource.api_action.lower())
        return None if operation is None else set(_input_shape(operation).members)

    def _operation(self) -> str:
        return _SUPPORTED_ACTIONS[self.resource.api_action.lower()]

    def _task_failed(self, env: Environment, error: str, cause: str) -> FailureEvent:
        error_name = (
            StatesErrorName(typ=StatesErrorNameType.StatesTaskFailed)
            if error == StatesErrorNameType.StatesTaskFailed.to_name()
            else CustomErrorName(error)
        )
        return FailureEvent(
            env=env,
            error_name=error_name,
            event_type=HistoryEventType.TaskFailed,
            event_details=cast(
                EventDetails,
                {
                    "taskFailedEventDetails": TaskFailedEventDetails(
                        error=error,
                        cause=cause,
                        resource=self._get_sfn_resource(),
                        resourceType=self._get_sfn_resource_type(),
                    )
                },
            ),
        )

    def _from_error(self, env: Environment, ex: Exception) -> FailureEvent:
        if isinstance(ex, ClientError):
            error = ex.response["Error"]
            details = f"Service: AmazonSageMaker; Status Code: 400; Error Code: {error['Code']}"
            return self._task_failed(env, SERVICE_ERROR, f"{error['Message']} ({details})")
        if isinstance(ex, _RejectedRequestError):
            return self._task_failed(env, SERVICE_ERROR, str(ex))
        return super()._from_error(env=env, ex=ex)

    def _eval_service_task(
        self,
        env: Environment,
        resource_runtime_part: ResourceRuntimePart,
        normalised_parameters: dict,
        state_credentials: StateCredentials,
    ) -> None:
        report = ParamValidator().validate(normalised_parameters, _input_shape(self._operation()))
        if report.has_errors():
            raise _RejectedRequestError(report.generate_report())
        client: Any = boto_client_for(
            service="sagemaker", region=resource_runtime_part.region, state_credentials=state_credentials
        )
        response = client.create_training_job(**normalised_parameters)
        response.pop("ResponseMetadata", None)
        env.stack.append(response)

    def _build_sync_resolver(
        self,
        env: Environment,
        resource_runtime_part: ResourceRuntimePart,
        normalised_parameters: dict,
        state_credentials: StateCredentials,
    ) -> Callable[[], Any] | None:
        env.stack.pop()  # CreateTrainingJob's response: the description replaces it
        client: Any = boto_client_for(
            service="sagemaker", region=resource_runtime_part.region, state_credentials=state_credentials
        )
        return _TrainingJobWatch(client, normalised_parameters["TrainingJobName"], self, env)

    def _eval_sync(
        self,
        env: Environment,
        sync_resolver: Callable[[], Any] | None,
        timeout_seconds: int | None,
        callback_endpoint: CallbackEndpoint | None,
        heartbeat_endpoint: HeartbeatEndpoint | None,
    ) -> Any:
        waited = super()._eval_sync
        outcome = waited(env, sync_resolver, timeout_seconds, callback_endpoint, heartbeat_endpoint)
        if isinstance(sync_resolver, _TrainingJobWatch) and isinstance(env.program_state(), ProgramStopped):
            sync_resolver.stop_job()
        return outcome


class _TrainingJobWatch:
    """The `.sync` resolver: None while the job runs, its description once Completed; raises if it failed."""

    def __init__(self, client: Any, job_name: str, task: StateTaskServiceSageMaker, env: Environment) -> None:
        self._client = client
        self.job_name = job_name
        self._task = task
        self._env = env

    def __call__(self) -> Any | None:
        description = self._client.describe_training_job(TrainingJobName=self.job_name)
        description.pop("ResponseMetadata", None)
        description = _json_ready(description)
        status = description["TrainingJobStatus"]
        if status == "Completed":
            return description
        if status in _TERMINAL_FAILURES:
            error = StatesErrorNameType.StatesTaskFailed.to_name()
            failure = self._task._task_failed(self._env, error, to_json_str(description))
            raise FailureEventException(failure)
        return None

    def stop_job(self) -> None:
        """The execution was stopped while waiting: stop the job, as Step Functions does."""
        try:
            self._client.stop_training_job(TrainingJobName=self.job_name)
        except ClientError as exc:  # it ended meanwhile: nothing to stop
            LOG.info("stopping training job %s after the execution stopped: %s", self.job_name, exc)
