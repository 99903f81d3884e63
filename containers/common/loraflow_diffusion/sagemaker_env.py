"""SageMaker's training container path contract (`/opt/ml/...`), overridable through `SM_*` variables.

SageMaker sets none of the overrides inside its own containers (the defaults are the contract); the
local cloud sets all of them when it runs the trainer as a local process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_CHANNEL_PREFIX = "SM_CHANNEL_"


@dataclass(frozen=True)
class TrainingPaths:
    input_dir: Path
    input_config_dir: Path
    model_dir: Path
    output_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    # Channels named by `SM_CHANNEL_<NAME>`; any other channel lives under `<input_dir>/data/<name>`.
    channel_overrides: Mapping[str, Path] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrainingPaths:
        env = os.environ if environ is None else environ
        input_dir = Path(env.get("SM_INPUT_DIR", "/opt/ml/input"))
        output_dir = Path(env.get("SM_OUTPUT_DIR", "/opt/ml/output"))
        channels = {
            key[len(_CHANNEL_PREFIX) :].lower(): Path(value)
            for key, value in env.items()
            if key.startswith(_CHANNEL_PREFIX)
        }
        return cls(
            input_dir=input_dir,
            input_config_dir=Path(env.get("SM_INPUT_CONFIG_DIR", str(input_dir / "config"))),
            model_dir=Path(env.get("SM_MODEL_DIR", "/opt/ml/model")),
            output_dir=output_dir,
            output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", str(output_dir / "data"))),
            checkpoint_dir=Path(env.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints")),
            channel_overrides=channels,
        )

    def channel(self, name: str) -> Path:
        return self.channel_overrides.get(name.lower(), self.input_dir / "data" / name)

    @property
    def hyperparameters_file(self) -> Path:
        return self.input_config_dir / "hyperparameters.json"

    @property
    def input_data_config_file(self) -> Path:
        return self.input_config_dir / "inputdataconfig.json"

    @property
    def resource_config_file(self) -> Path:
        return self.input_config_dir / "resourceconfig.json"

    @property
    def failure_file(self) -> Path:
        """SageMaker reports this file's content (first 1 KiB) as the job's `FailureReason`."""
        return self.output_dir / "failure"

    @property
    def model_cache_dir(self) -> Path:
        """Base models downloaded for this job; on the job's storage volume, not the small root disk."""
        return self.input_dir / "model-cache"

    def read_hyperparameters(self) -> dict[str, object]:
        """The hyperparameters JSON object (SageMaker writes every value as a string); {} when absent."""
        if not self.hyperparameters_file.is_file():
            return {}
        loaded = json.loads(self.hyperparameters_file.read_text(encoding="utf-8"))
        if not isinstance(loaded, dict):
            raise ValueError(f"{self.hyperparameters_file} holds {type(loaded).__name__}, not a JSON object")
        return loaded
