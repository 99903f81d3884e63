"""The inference server's settings, read from the environment once, at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class InferenceSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    # Base models fetched from S3 or the Hub; the endpoint's instance disk, reused across requests.
    model_cache_dir: Path = Path("/tmp/loraflow/models")
    # Base pipelines kept loaded (LRU): most stacks use one base model, a second one costs GPU memory.
    max_cached_pipelines: Annotated[int, Field(ge=1, le=2)] = 1
    # Precision on a GPU (the CPU always renders in fp32).
    precision: Literal["no", "fp16", "bf16"] = "fp16"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InferenceSettings:
        env = os.environ if environ is None else environ
        names = {
            "model_cache_dir": "LORAFLOW_MODEL_CACHE_DIR",
            "max_cached_pipelines": "LORAFLOW_MAX_CACHED_PIPELINES",
            "precision": "LORAFLOW_PRECISION",
        }
        return cls.model_validate({field: env[name] for field, name in names.items() if name in env})
