"""At ingest, a Hub base model is pinned: resolved to the exact commit the job will train on (recorded on
the job), checked to exist and to be readable by the stack's token, before any GPU time is spent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from loraflow_shared.base_models import BaseModelSource, HubModel, parse_hub_model
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_shared.hub import HubError, HubProblem, HubResolution

CONFIG_KEY = "pretrained_model_name_or_path"


class HubResolver(Protocol):
    def resolve(self, model: HubModel) -> HubResolution:
        """Raises HubError."""
        ...


@dataclass(frozen=True)
class HubLookup:
    source: BaseModelSource | None = None
    model_index: str | None = None  # the Hub's model_index.json at the commit: tells the family
    warnings: list[Problem] = field(default_factory=list)
    error: Problem | None = None


def look_up(base_model: str, resolver: HubResolver) -> HubLookup:
    model = parse_hub_model(base_model)
    if model is None:  # an s3:// folder or file, a URL: used as it is
        return HubLookup()
    try:
        resolution = resolver.resolve(model)
    except HubError as exc:
        if exc.problem is HubProblem.UNREACHABLE:
            return HubLookup(warnings=[_unpinned(base_model, exc.message)])
        return HubLookup(error=Problem(code=ErrorCode.INVALID_CONFIG, path=CONFIG_KEY, message=exc.message))
    source = BaseModelSource(repo=model.repo, revision=model.revision, commit=resolution.commit)
    return HubLookup(source=source, model_index=resolution.model_index)


def _unpinned(base_model: str, reason: str) -> Problem:
    return Problem(
        code=ErrorCode.SETTING_ADJUSTED,
        path=CONFIG_KEY,
        message=(
            f"{reason}; {base_model!r} could not be pinned to a commit, so the trainer downloads it from the"
            " Hub as it is when training starts, without the stack's mirror"
        ),
    )
