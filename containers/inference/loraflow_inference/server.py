"""SageMaker's inference container contract over HTTP: `GET /ping`, `POST /invocations` (port 8080).

For an async endpoint the request body is the request JSON SageMaker read from S3 and the response
body becomes the output object; any non-200 answer fails the invocation (error topic).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from flask.typing import ResponseReturnValue
from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.errors import ErrorCode, LoraflowError
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from loraflow_inference.handler import PreviewRenderer
from loraflow_inference.settings import InferenceSettings

logger = logging.getLogger(__name__)


def create_app(renderer: PreviewRenderer | None = None) -> Flask:
    """The app; without a renderer, one is built from the environment's settings (validated now)."""
    renderer = renderer or PreviewRenderer.from_settings(InferenceSettings.from_env())
    app = Flask(__name__)

    @app.get("/ping")
    def ping() -> Response:
        return jsonify(status="ok")

    @app.post("/invocations")
    def invocations() -> tuple[Response, int]:
        try:
            preview_request = PreviewRequest.model_validate_json(request.get_data())
        except ValidationError as exc:
            return _error(ErrorCode.BAD_REQUEST, _describe(exc), 400)
        response = renderer.render(preview_request)
        return jsonify(response.model_dump(mode="json")), 200

    @app.errorhandler(LoraflowError)
    def domain_error(exc: LoraflowError) -> tuple[Response, int]:
        return _error(exc.code, exc.message, 500)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> ResponseReturnValue:
        if isinstance(exc, HTTPException):  # 404, 405...: Flask's own answer
            return exc.get_response()
        logger.exception("unexpected error")
        return _error(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", 500)

    return app


def _error(code: ErrorCode, message: str, status: int) -> tuple[Response, int]:
    return jsonify(code=str(code), message=message), status


def _describe(exc: ValidationError) -> str:
    """`field: problem; ...` for a request that is not a valid PreviewRequest."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}" for error in exc.errors()
    )
