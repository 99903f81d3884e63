"""Resolving a Hub model to its exact commit, with the Hub's HTTP API (no huggingface_hub: the functions
stay small). `HF_ENDPOINT` is honoured as `huggingface_hub` honours it, so a Hub served on loopback works.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from loraflow_shared.base_models import HubModel
from loraflow_shared.families import MODEL_INDEX_FILE

DEFAULT_ENDPOINT = "https://huggingface.co"
_TIMEOUT_S = 10.0


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


class HubProblem(StrEnum):
    NOT_FOUND = "not_found"  # no such repository or revision
    NO_ACCESS = "no_access"  # gated or private, and the token (if any) may not read it
    UNREACHABLE = "unreachable"  # network, timeout, the Hub's own errors


class HubError(Exception):
    def __init__(self, problem: HubProblem, message: str) -> None:
        super().__init__(message)
        self.problem = problem
        self.message = message


@dataclass(frozen=True)
class HubResolution:
    commit: str
    gated: bool
    has_model_index: bool  # a diffusers repo
    model_index: str | None = None  # its text at the commit, when read


def resolve(
    model: HubModel, token: str | None, endpoint: str | None = None, read_model_index: bool = True
) -> HubResolution:
    """The commit `model` names now, and its model_index.json (read with the token: a gated repo's
    metadata is public, its files are not, so reading it is also the check that the token may download)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:  # huggingface_hub's switch
        raise HubError(HubProblem.UNREACHABLE, "the Hub is switched off here (HF_HUB_OFFLINE)")
    base = (endpoint or hub_endpoint()).rstrip("/")
    revision = quote(model.revision or "main", safe="")
    info = json.loads(_get(f"{base}/api/models/{model.repo}/revision/{revision}", token, model))
    commit = str(info.get("sha") or "")
    if len(commit) != 40:
        raise HubError(HubProblem.UNREACHABLE, f"the Hub named no commit for {model.reference}")
    files = {str(s.get("rfilename")) for s in info.get("siblings") or [] if isinstance(s, dict)}
    found = HubResolution(
        commit=commit, gated=bool(info.get("gated")), has_model_index=MODEL_INDEX_FILE in files
    )
    if not (read_model_index and found.has_model_index):
        return found
    return replace(found, model_index=read_hub_text(model, commit, MODEL_INDEX_FILE, token, base))


def read_hub_text(
    model: HubModel, commit: str, path: str, token: str | None, endpoint: str | None = None
) -> str:
    base = (endpoint or hub_endpoint()).rstrip("/")
    return _get(f"{base}/{model.repo}/resolve/{commit}/{path}", token, model)


def _get(url: str, token: str | None, model: HubModel) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            return bytes(response.read()).decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise _http_error(exc, model, token is not None) from None
    except (urllib.error.URLError, TimeoutError, OSError, UnicodeDecodeError) as exc:
        raise HubError(HubProblem.UNREACHABLE, f"the Hub could not be reached: {_reason(exc)}") from None


def _http_error(exc: urllib.error.HTTPError, model: HubModel, has_token: bool) -> HubError:
    code = exc.headers.get("X-Error-Code", "") if exc.headers else ""
    if exc.code == 404 and code == "RevisionNotFound":
        return HubError(HubProblem.NOT_FOUND, f"{model.repo} has no revision {model.revision or 'main'!r}")
    if exc.code == 404 or code == "RepoNotFound":  # the Hub answers 401 for a private repo without a token
        return HubError(HubProblem.NOT_FOUND, f"there is no Hub model {model.repo!r} (or it is private)")
    if exc.code in (401, 403):
        whose = (
            "the stack's token may not read it: accept its license with that account"
            if has_token
            else ("deploy with HuggingFaceTokenSecretArn naming a token whose account accepted its license")
        )
        return HubError(HubProblem.NO_ACCESS, f"{model.repo} is gated or private; {whose}")
    return HubError(HubProblem.UNREACHABLE, f"the Hub answered {exc.code} for {model.reference}")


def _reason(exc: BaseException) -> str:
    reason: Any = getattr(exc, "reason", None) or exc
    return str(reason)[:200]
