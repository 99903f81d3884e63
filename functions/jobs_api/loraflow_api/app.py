"""Lambda entry point: REST API proxy events (API Gateway enforces the API key before we run)."""

from __future__ import annotations

import re
from functools import cache
from http import HTTPStatus
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.utilities.typing import LambdaContext
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.jobs.errors import GenerationNotFound, JobNotFound
from pydantic import ValidationError

from loraflow_api import gallery as gallery_page
from loraflow_api.adapters import build_generations, build_queries
from loraflow_api.generations import Generations
from loraflow_api.logic import JobQueries, ListJobsQuery
from loraflow_api.settings import ApiSettings

logger = Logger()
app = APIGatewayRestResolver()

# The one mapping from domain error codes to HTTP statuses; any other code is a server error.
HTTP_STATUS_BY_CODE: dict[ErrorCode, HTTPStatus] = {
    ErrorCode.BAD_REQUEST: HTTPStatus.BAD_REQUEST,
    ErrorCode.JOB_NOT_FOUND: HTTPStatus.NOT_FOUND,
    ErrorCode.JOB_STATE_CONFLICT: HTTPStatus.CONFLICT,
    ErrorCode.GENERATION_NOT_FOUND: HTTPStatus.NOT_FOUND,
    ErrorCode.TOO_MANY_GENERATIONS: HTTPStatus.TOO_MANY_REQUESTS,
}
PATH_ECHO_LIMIT = 100  # a 404 names the path it did not find, never more than this of it
_JOB_ROUTE = re.compile(r"/jobs/(?P<job_id>[^/]+)(?:/cancel|/retry|/generations)?")
_GENERATION_ROUTE = re.compile(r"/jobs/(?P<job_id>[^/]+)/generations/(?P<generation_id>[^/]+)")


@cache
def default_queries() -> JobQueries:
    """Built on the first invocation (cold start) from the environment, then reused."""
    return build_queries(ApiSettings.from_environ())


@cache
def default_generations() -> Generations:
    """Built at cold start beside `default_queries` (the local cloud sets a function's environment only
    then), then reused."""
    return build_generations(ApiSettings.from_environ())


def _queries() -> JobQueries:
    queries: JobQueries = app.context["queries"]
    return queries


def _generations() -> Generations:
    generations: Generations = app.context["generations"]
    return generations


def _accepted(body: dict[str, Any]) -> Response[Any]:
    return Response(
        status_code=HTTPStatus.ACCEPTED.value, content_type=content_types.APPLICATION_JSON, body=body
    )


def _list_query(parameters: dict[str, str]) -> ListJobsQuery:
    try:
        return ListJobsQuery.model_validate(parameters)
    except ValidationError as exc:
        details = "; ".join(
            f"query parameter {'.'.join(str(part) for part in error['loc'])!r}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise LoraflowError(ErrorCode.BAD_REQUEST, details) from exc


@app.get("/")
def gallery() -> Response[str]:
    """The gallery page: no API key needed for the page (API Gateway: ApiKeyRequired false on this route)."""
    return Response(
        status_code=HTTPStatus.OK.value,
        content_type="text/html; charset=utf-8",
        body=gallery_page.page(),
        headers=gallery_page.HEADERS,
    )


@app.get("/jobs")
def list_jobs() -> dict[str, Any]:
    query = _list_query(app.current_event.query_string_parameters or {})
    return _queries().list_jobs(query).model_dump(mode="json")


@app.get("/jobs/<job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    return _queries().get_job(job_id).model_dump(mode="json")


@app.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> dict[str, Any]:
    return _queries().cancel_job(job_id).model_dump(mode="json")


@app.post("/jobs/<job_id>/retry")
def retry_job(job_id: str) -> Response[Any]:
    return _accepted(_queries().retry_job(job_id).model_dump(mode="json"))


@app.post("/jobs/<job_id>/generations")
def create_generation(job_id: str) -> Response[Any]:
    return _accepted(_generations().create(job_id, app.current_event.decoded_body).model_dump(mode="json"))


@app.get("/jobs/<job_id>/generations/<generation_id>")
def get_generation(job_id: str, generation_id: str) -> dict[str, Any]:
    return _generations().get(job_id, generation_id).model_dump(mode="json")


def _error(status: HTTPStatus, code: ErrorCode, message: str) -> Response[Any]:
    return Response(
        status_code=status.value,
        content_type=content_types.APPLICATION_JSON,
        body={"code": code.value, "message": message},
    )


@app.exception_handler(LoraflowError)
def domain_error(exc: LoraflowError) -> Response[Any]:
    status = HTTP_STATUS_BY_CODE.get(exc.code, HTTPStatus.INTERNAL_SERVER_ERROR)
    return _error(status, exc.code, exc.message)


@app.exception_handler(Exception)
def unexpected(exc: Exception) -> Response[Any]:
    logger.exception("unhandled error")  # the trace goes to the logs, never to the client
    return _error(HTTPStatus.INTERNAL_SERVER_ERROR, ErrorCode.INTERNAL_ERROR, "internal error")


@app.not_found
def no_route(_exc: Exception) -> Response[Any]:
    event = app.current_event
    generation_route = _GENERATION_ROUTE.fullmatch(event.path)
    if generation_route is not None:  # ids Powertools' route pattern does not match are unknown too
        return domain_error(GenerationNotFound(*generation_route.group("job_id", "generation_id")))
    job_route = _JOB_ROUTE.fullmatch(event.path)
    if job_route is not None:  # an id Powertools' route pattern does not match is still an unknown job
        return domain_error(JobNotFound(job_route.group("job_id")))
    path = event.path if len(event.path) <= PATH_ECHO_LIMIT else event.path[:PATH_ECHO_LIMIT] + "…"
    return _error(HTTPStatus.NOT_FOUND, ErrorCode.BAD_REQUEST, f"no route {event.http_method} {path!r}")


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(
    event: dict[str, Any],
    context: LambdaContext,
    queries: JobQueries | None = None,
    generations: Generations | None = None,
) -> Any:
    if queries is None and generations is None:  # deployed: both from the environment
        queries, generations = default_queries(), default_generations()
    app.append_context(queries=queries, generations=generations)
    return app.resolve(event, context)
