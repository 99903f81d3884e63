"""The REST API router: API Gateway's proxy events and responses, keys and errors, over real HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loraflow_local.api_router import RestApiRouter, build_routes
from loraflow_local.intrinsics import TemplateError
from loraflow_local.lambda_runtime import FunctionSpec, LambdaRegistry

pytestmark = pytest.mark.integration

FAKES = Path(__file__).parent / "fakes"
ARNS = {
    name: f"arn:aws:lambda:us-east-1:123456789012:function:{name}" for name in ("proxy", "broken", "failing")
}


def _operation(function: str, secured: bool = True) -> dict[str, Any]:
    uri = f"arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/{ARNS[function]}/invocations"
    operation: dict[str, Any] = {
        "x-amazon-apigateway-integration": {"type": "aws_proxy", "httpMethod": "POST", "uri": uri}
    }
    if secured:
        operation["security"] = [{"api_key": []}]
    return operation


SWAGGER = {
    "swagger": "2.0",
    "paths": {
        "/jobs": {"get": _operation("proxy")},
        "/jobs/{job_id}": {"get": _operation("proxy"), "delete": _operation("failing")},
        "/files/{path+}": {"x-amazon-apigateway-any-method": _operation("proxy", secured=False)},
        "/broken": {"get": _operation("broken")},
    },
    "securityDefinitions": {"api_key": {"type": "apiKey", "name": "x-api-key", "in": "header"}},
}


@pytest.fixture(scope="module")
def router() -> Iterator[RestApiRouter]:
    registry = LambdaRegistry()
    handlers = {"proxy": "proxy", "broken": "broken_proxy", "failing": "fail"}
    for name, handler in handlers.items():
        registry.register(
            FunctionSpec(
                name=name,
                arn=ARNS[name],
                handler=f"loraflow_local_test_handlers.{handler}",
                code_paths=(FAKES,),
            )
        )
    running = RestApiRouter(
        "api123", "v1", build_routes(SWAGGER, {arn: name for name, arn in ARNS.items()}), ["secret"], registry
    )
    running.start()
    yield running
    running.stop()


def _call(
    router: RestApiRouter,
    path: str,
    method: str = "GET",
    key: str | None = "secret",
    body: bytes | None = None,
) -> tuple[int, Any, Any]:
    headers = {"x-api-key": key} if key else {}
    request = urllib.request.Request(router.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


@pytest.fixture
def events(recorded_events: list[Any]) -> list[Any]:
    return recorded_events


def test_given_get_with_path_and_query_when_routed_then_rest_proxy_event(router: RestApiRouter, events):
    status, headers, body = _call(router, "/jobs/job%201?dataset=a&dataset=b&limit=5")
    assert (status, body) == (201, {"ok": True})
    assert headers.get_all("set-cookie") == ["a=1", "b=2"]
    (event,) = events
    assert (event["resource"], event["path"], event["httpMethod"]) == ("/jobs/{job_id}", "/jobs/job 1", "GET")
    assert event["pathParameters"] == {"job_id": "job 1"}
    assert event["queryStringParameters"] == {"dataset": "b", "limit": "5"}
    assert event["multiValueQueryStringParameters"] == {"dataset": ["a", "b"], "limit": ["5"]}
    assert event["headers"]["x-api-key"] == "secret"
    context = event["requestContext"]
    assert (context["stage"], context["resourcePath"], context["apiId"]) == ("v1", "/jobs/{job_id}", "api123")
    assert context["identity"]["apiKey"] == "secret"
    assert (event["body"], event["isBase64Encoded"]) == (None, False)


def test_given_greedy_path_and_any_method_when_posted_then_body_passed(router: RestApiRouter, events):
    status, _, _ = _call(router, "/files/a/b.txt", method="POST", key=None, body=b'{"x": 1}')
    assert status == 201
    assert events[0]["pathParameters"] == {"path": "a/b.txt"}
    assert (events[0]["body"], events[0]["httpMethod"]) == ('{"x": 1}', "POST")


@pytest.mark.parametrize("key", [None, "wrong"])
def test_given_secured_method_when_key_missing_or_wrong_then_forbidden(router: RestApiRouter, events, key):
    assert _call(router, "/jobs", key=key)[::2] == (403, {"message": "Forbidden"})
    assert events == []


@pytest.mark.parametrize("path", ["/nowhere", "/jobs/1/extra"])
def test_given_unknown_route_when_called_then_missing_authentication_token(router: RestApiRouter, path):
    assert _call(router, path)[::2] == (403, {"message": "Missing Authentication Token"})


def test_given_known_path_with_other_method_when_called_then_missing_authentication_token(
    router: RestApiRouter,
):
    assert _call(router, "/jobs", method="POST", body=b"{}")[::2] == (
        403,
        {"message": "Missing Authentication Token"},
    )


@pytest.mark.parametrize("path,method", [("/broken", "GET"), ("/jobs/1", "DELETE")])
def test_given_function_error_or_bad_proxy_response_then_502(router: RestApiRouter, path, method):
    assert _call(router, path, method=method)[::2] == (502, {"message": "Internal server error"})


def test_given_non_proxy_integration_when_building_routes_then_error_names_the_method():
    swagger = {"paths": {"/x": {"get": {"x-amazon-apigateway-integration": {"type": "mock"}}}}}
    with pytest.raises(TemplateError, match="GET /x"):
        build_routes(swagger, {})


@pytest.mark.parametrize("body_format", ["swagger", "openapi"])
def test_given_api_key_scheme_in_either_body_format_when_building_routes_then_method_needs_a_key(body_format):
    # Swagger 2.0 declares it in securityDefinitions, OpenAPI 3 (SAM's OpenApiVersion) in components.
    scheme = {"api_key": {"type": "apiKey", "name": "x-api-key", "in": "header"}}
    declared = (
        {"securityDefinitions": scheme}
        if body_format == "swagger"
        else {"components": {"securitySchemes": scheme}}
    )
    body = {"paths": {"/jobs": {"get": _operation("proxy")}}, **declared}

    (route,) = build_routes(body, {ARNS["proxy"]: "proxy"})

    assert route.api_key_required
