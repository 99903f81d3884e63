"""The gallery page (`gallery.html`, one self-contained file) as the API serves it at `GET /`."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

from loraflow_shared.jobs.generations import GenerationRequest
from loraflow_shared.jobs.model import RETRYABLE_STATUSES, TERMINAL_STATUSES, JobStatus

PAGE_FILE = "gallery.html"
CONSTANTS_MARK = "/*LORAFLOW_CONSTANTS*/"  # where the page's JSON constants go
# The page runs its own inline script and styles and calls only its own origin; pictures and downloads
# are presigned S3 URLs (https on AWS, the local cloud's http).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src http: https: data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


@cache
def page() -> str:
    template = files("loraflow_api").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    # "<" escaped: nothing in the JSON can close its <script> element.
    return template.replace(CONSTANTS_MARK, json.dumps(constants()).replace("<", "\\u003c"))


def constants() -> dict[str, Any]:
    """What the page's script knows of the API, from the API's own definitions: statuses and bounds."""
    fields = GenerationRequest.model_json_schema()["properties"]
    return {
        "unfinished_statuses": [status.value for status in JobStatus if status not in TERMINAL_STATUSES],
        "retryable_statuses": sorted(status.value for status in RETRYABLE_STATUSES),
        "steps": _bounds(fields["steps"]),
        "lora_scale": _bounds(fields["lora_scale"]),
    }


def _bounds(schema: dict[str, Any]) -> dict[str, float]:
    """`minimum` and `maximum` of a number field's JSON schema (an optional one's is under `anyOf`)."""
    numeric = next(option for option in schema.get("anyOf", [schema]) if "maximum" in option)
    return {"minimum": numeric["minimum"], "maximum": numeric["maximum"]}
