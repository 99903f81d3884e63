"""The jobs API as a client sees it: HTTPS (or the local cloud's HTTP) with the API key, JSON in and out,
and the API's own `{code, message}` errors raised as `ApiError`."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

TIMEOUT_S = 30


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status, self.code = status, code


class JobsApi:
    def __init__(self, api_url: str, api_key: str) -> None:
        self._url, self._key = api_url.rstrip("/"), api_key

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{urllib.parse.quote(job_id, safe='')}")

    def jobs(self, dataset: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The newest `limit` jobs, of one dataset or of all."""
        query = urllib.parse.urlencode(
            {"limit": limit} if dataset is None else {"dataset": dataset, "limit": limit}
        )
        items: list[dict[str, Any]] = self._call("GET", f"/jobs?{query}")["items"]
        return items

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{urllib.parse.quote(job_id, safe='')}/cancel")

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{urllib.parse.quote(job_id, safe='')}/retry")

    def generate(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /jobs/{job_id}/generations`: the new generation (PENDING)."""
        return self._call("POST", f"/jobs/{urllib.parse.quote(job_id, safe='')}/generations", body)

    def generation(self, job_id: str, generation_id: str) -> dict[str, Any]:
        job, generation = (urllib.parse.quote(part, safe="") for part in (job_id, generation_id))
        return self._call("GET", f"/jobs/{job}/generations/{generation}")

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"x-api-key": self._key}
        data = None
        if payload is not None:
            data, headers["content-type"] = json.dumps(payload).encode(), "application/json"
        request = urllib.request.Request(self._url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                body: dict[str, Any] = json.loads(response.read() or b"{}")
                return body
        except urllib.error.HTTPError as error:
            raise _api_error(error) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise ApiError(0, "UNREACHABLE", f"{self._url} does not answer: {reason}") from None


def _api_error(error: urllib.error.HTTPError) -> ApiError:
    raw = error.read() or b"{}"
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    code = body.get("code") or ("FORBIDDEN" if error.code == 403 else "HTTP_ERROR")
    message = body.get("message") or (
        "the API key was refused" if error.code == 403 else raw[:200].decode(errors="replace")
    )
    return ApiError(error.code, code, message)


def download(url: str, target: Path) -> Path:
    """A presigned URL's object into `target` (folders made as needed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=120) as response:
        target.write_bytes(response.read())
    return target
