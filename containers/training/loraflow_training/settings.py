"""What the job is told: SageMaker hyperparameters and the dataset's kohya config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from loraflow_diffusion.sagemaker_env import TrainingPaths
from loraflow_shared.dataset.config import ParsedConfig, parse_config
from loraflow_shared.dataset.layout import check_key_safe
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.settings import EnvSettings
from pydantic import BaseModel, ConfigDict, Field, ValidationError

NonEmptyStr = Annotated[str, Field(min_length=1)]


class Hyperparameters(BaseModel):
    """The state machine's `HyperParameters` (SageMaker passes every value as a string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config_file: NonEmptyStr  # relative to the dataset root, e.g. "kohya-sdxl-config.toml"
    base_model: NonEmptyStr  # any reference `load_pipeline` accepts (a Hub model pinned: owner/name@commit)
    # s3://.../base-models/hub/<repo>@<commit>/ when this job writes the stack's mirror of it; "" otherwise.
    base_model_mirror: str = ""
    job_id: NonEmptyStr

    @classmethod
    def from_paths(cls, paths: TrainingPaths) -> Hyperparameters:
        try:
            return cls.model_validate(paths.read_hyperparameters())
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '-'}: {e['msg']}" for e in exc.errors())
            # The pipeline, not the user, writes these: a bad one is our bug.
            raise LoraflowError(
                ErrorCode.INTERNAL_ERROR, f"bad training hyperparameters: {problems}"
            ) from exc
        except ValueError as exc:  # not JSON, or not an object
            raise LoraflowError(ErrorCode.INTERNAL_ERROR, f"unreadable hyperparameters: {exc}") from exc


class TrainerSettings(EnvSettings):
    """The trainer's own environment (SageMaker sets none of it; tests and local runs may)."""

    # Processes for data-parallel training; unset: one per CUDA device (one on a CPU-only machine).
    # Set (e.g. 2) to run several CPU processes with gloo.
    loraflow_num_processes: int | None = Field(default=None, ge=1, le=64)
    # Seconds between progress.json updates (the API shows them; at least every 30 s is promised).
    loraflow_progress_interval_s: float = Field(default=15.0, gt=0, le=30)


def read_config(dataset_dir: Path, config_file: str) -> ParsedConfig:
    """Parse the dataset's kohya TOML with the same rules validation used."""
    check_key_safe(config_file)
    config_path = dataset_dir / config_file
    if not config_path.is_file():
        raise LoraflowError(
            ErrorCode.INVALID_CONFIG, "config file not found in the dataset channel", path=config_file
        )
    return parse_config(config_path.read_bytes(), config_file)
