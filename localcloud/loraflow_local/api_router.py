"""API Gateway (REST, Lambda proxy integration) as a local HTTP server built from the template's swagger.

Behaviour copied from API Gateway: URLs are `/<stage>/<path>`; a method whose swagger `security` names an
apiKey definition needs a valid, enabled key of a usage plan of this API in `x-api-key`, else 403
`{"message": "Forbidden"}`; an unknown path, stage or method is 403 `{"message": "Missing Authentication
Token"}`; a function error or a malformed proxy response is 502 `{"message": "Internal server error"}`.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from loraflow_local.intrinsics import TemplateError
from loraflow_local.lambda_runtime import LambdaRegistry

LOG = logging.getLogger(__name__)

_FUNCTION_ARN = re.compile(r"/functions/(arn:[^/]+:function:[^/:]+)(?::[^/]*)?/invocations$")
_HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "x-amazon-apigateway-any-method"}


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str  # path and query, as sent
    headers: Mapping[str, list[str]]  # lower-cased names
    body: bytes = b""
    client_ip: str = "127.0.0.1"

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[-1] if values else None


Response = tuple[int, dict[str, list[str]], bytes]


@dataclass(frozen=True)
class Route:
    resource: str  # the swagger path, e.g. /jobs/{job_id}
    method: str  # upper case, or ANY
    function_name: str
    api_key_required: bool
    pattern: re.Pattern[str]

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if self.method not in ("ANY", method):
            return None
        found = self.pattern.fullmatch(path)
        return None if found is None else {name: unquote(value) for name, value in found.groupdict().items()}


def build_routes(swagger: Mapping[str, Any], function_names_by_arn: Mapping[str, str]) -> list[Route]:
    """Routes from a resolved swagger body, literal paths first (API Gateway prefers the most specific)."""
    # Swagger 2.0 names its key schemes in securityDefinitions, OpenAPI 3 in components.securitySchemes.
    components = swagger.get("components") or {}
    definitions = swagger.get("securityDefinitions") or components.get("securitySchemes") or {}
    key_schemes = {name for name, scheme in definitions.items() if scheme.get("type") == "apiKey"}
    routes = []
    for path, operations in (swagger.get("paths") or {}).items():
        for method, operation in operations.items():
            if method.lower() not in _HTTP_METHODS:
                continue
            security = operation.get("security", swagger.get("security", []))
            routes.append(
                Route(
                    resource=path,
                    method="ANY" if method.startswith("x-amazon") else method.upper(),
                    function_name=_proxy_function(path, method, operation, function_names_by_arn),
                    api_key_required=any(set(entry) & key_schemes for entry in security),
                    pattern=_path_pattern(path),
                )
            )
    return sorted(routes, key=lambda route: (route.resource.count("{"), -len(route.resource)))


def _proxy_function(path: str, method: str, operation: Mapping[str, Any], names: Mapping[str, str]) -> str:
    integration = operation.get("x-amazon-apigateway-integration") or {}
    found = _FUNCTION_ARN.search(str(integration.get("uri", "")))
    if integration.get("type") != "aws_proxy" or found is None or found.group(1) not in names:
        raise TemplateError(f"{method.upper()} {path}: only Lambda proxy integrations run locally")
    return names[found.group(1)]


def _path_pattern(path: str) -> re.Pattern[str]:
    pattern = ""
    for literal, name, greedy in re.findall(r"([^{]*)(?:\{(\w+)(\+?)\})?", path):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P<{name}>.+)" if greedy else f"(?P<{name}>[^/]+)"
    return re.compile(pattern)


class RestApiRouter:
    def __init__(
        self,
        api_id: str,
        stage: str,
        routes: list[Route],
        api_keys: Collection[str],
        lambdas: LambdaRegistry,
        port: int = 0,
    ) -> None:
        self.api_id = api_id
        self.stage = stage
        self.routes = routes
        self.api_keys = frozenset(api_keys)
        self.lambdas = lambdas
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"api-{api_id}", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/{self.stage}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def respond(self, request: HttpRequest) -> Response:
        """Answer one request as API Gateway would."""
        url = urlsplit(request.target)
        prefix = f"/{self.stage}"
        path = unquote(url.path)
        if not (path == prefix or path.startswith(prefix + "/")):
            return _message(403, "Missing Authentication Token")
        path = path[len(prefix) :] or "/"
        for route in self.routes:
            parameters = route.match(request.method, path)
            if parameters is None:
                continue
            if route.api_key_required and request.header("x-api-key") not in self.api_keys:
                return _message(403, "Forbidden")
            return self._invoke(route, self._event(route, request, path, url.query, parameters))
        return _message(403, "Missing Authentication Token")

    def _event(
        self, route: Route, request: HttpRequest, path: str, query: str, parameters: dict[str, str]
    ) -> dict[str, Any]:
        multi_query = parse_qs(query, keep_blank_values=True) or None
        try:
            text, encoded = request.body.decode("utf-8"), False
        except UnicodeDecodeError:
            text, encoded = base64.b64encode(request.body).decode("ascii"), True
        return {
            "resource": route.resource,
            "path": path,
            "httpMethod": request.method,
            "headers": {name: values[-1] for name, values in request.headers.items()} or None,
            "multiValueHeaders": dict(request.headers) or None,
            "queryStringParameters": {k: v[-1] for k, v in multi_query.items()} if multi_query else None,
            "multiValueQueryStringParameters": multi_query,
            "pathParameters": parameters or None,
            "stageVariables": None,
            "requestContext": {
                "resourcePath": route.resource,
                "httpMethod": request.method,
                "path": f"/{self.stage}{path}",
                "stage": self.stage,
                "requestId": str(uuid.uuid4()),
                "requestTimeEpoch": int(time.time() * 1000),
                "apiId": self.api_id,
                "protocol": "HTTP/1.1",
                "identity": {
                    "apiKey": request.header("x-api-key"),
                    "sourceIp": request.client_ip,
                    "userAgent": request.header("user-agent"),
                },
            },
            "body": text if request.body else None,
            "isBase64Encoded": encoded,
        }

    def _invoke(self, route: Route, event: dict[str, Any]) -> Response:
        result = self.lambdas.invoke(route.function_name, event)
        try:
            response = json.loads(result.payload)
            status = int(response["statusCode"])
        except (ValueError, KeyError, TypeError):
            response, status = None, 0
        if result.errored or response is None or not 100 <= status <= 599:
            LOG.warning("%s %s: function error or bad proxy response", event["httpMethod"], event["path"])
            return _message(502, "Internal server error")
        single = response.get("headers") or {}
        headers: dict[str, list[str]] = {name.lower(): [str(value)] for name, value in single.items()}
        for name, values in (response.get("multiValueHeaders") or {}).items():
            headers.setdefault(name.lower(), []).extend(str(value) for value in values)
        body = response.get("body") or ""
        payload = base64.b64decode(body) if response.get("isBase64Encoded") else str(body).encode("utf-8")
        headers.setdefault("content-type", ["application/json"])
        return status, headers, payload


def _message(status: int, message: str) -> Response:
    return status, {"content-type": ["application/json"]}, json.dumps({"message": message}).encode("utf-8")


def _handler_class(router: RestApiRouter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers: dict[str, list[str]] = {}
            for name, value in self.headers.items():
                headers.setdefault(name.lower(), []).append(value)
            request = HttpRequest(self.command, self.path, headers, body, self.client_address[0])
            status, response_headers, payload = router.respond(request)
            self.send_response(status)
            for name, values in response_headers.items():
                for value in values:
                    self.send_header(name, value)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle

        def do_HEAD(self) -> None:
            self._handle()

        def log_message(self, format: str, *args: Any) -> None:
            LOG.debug("api %s", format % args)

    return Handler
