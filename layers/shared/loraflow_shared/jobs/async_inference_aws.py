"""The boto3 side of the preview endpoints' requests, shared by the pipeline (previews) and the jobs API
(generations): InvokeEndpointAsync on a request JSON already in S3."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraflow_shared.jobs.preview_timing import PreviewTimeouts

if TYPE_CHECKING:
    from mypy_boto3_sagemaker_runtime import SageMakerRuntimeClient


class SageMakerAsyncEndpoints:
    def __init__(self, client: SageMakerRuntimeClient) -> None:
        self._client = client

    def invoke_async(
        self, endpoint_name: str, input_uri: str, inference_id: str, timeouts: PreviewTimeouts
    ) -> None:
        self._client.invoke_endpoint_async(
            EndpointName=endpoint_name,
            InputLocation=input_uri,
            InferenceId=inference_id,
            ContentType="application/json",
            InvocationTimeoutSeconds=timeouts.invocation_s,
            RequestTTLSeconds=timeouts.request_ttl_s,
        )
