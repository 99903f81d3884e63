"""`training_report.json`: what the run did, for the user and for `record_training` (warnings).

It extends the shared `TrainingReport` contract, so the pipeline Lambda parses it with that model
(extra keys allowed) and reads what the contract names (`warnings`, `output_name`, ...).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

from loraflow_shared.contracts import LossSummary, TrainingReport
from loraflow_shared.dataset.config import TrainingConfig

from loraflow_training.effect import EffectReport

REPORT_NAME = "training_report.json"
_MB = 1024 * 1024


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((peak if sys.platform == "darwin" else peak * 1024) / _MB, 1)  # macOS: bytes; Linux: KiB


class TrainingReportV2(TrainingReport):
    """`training_report.json`. Inherited from the contract: steps, final_loss (the last interval's mean),
    seconds, ignored_keys, warnings (WEAK_LORA, SETTING_ADJUSTED), peak_rss_mb, peak_cuda_mb."""

    output_name: str  # the kohya file is `<output_name>.safetensors`
    epochs: int
    job_id: str
    base_model: str
    model_family: str  # `ModelFamily.name`
    device: str
    dtype: str
    processes: int = 1  # data-parallel processes
    config: TrainingConfig  # as applied: the memory plan's and the hardware's choices filled in
    lora_files: list[str]  # in the model dir: pytorch_lora_weights.safetensors, <output_name>.safetensors
    trained_components: list[str]  # pipeline attributes, denoiser first: "unet", "text_encoder", ...
    resumed_from_step: int | None = None  # a restart (spot interruption) resumed from this checkpoint
    loss: LossSummary | None  # overrides the contract's default: the trainer always says
    images: int  # distinct training images, regularization images not included
    reg_images: int = 0
    images_per_subset: dict[str, int]
    repeats: dict[str, int]  # per subset folder
    samples_per_epoch: int
    images_per_bucket: dict[str, int]  # "WxH" -> images seen in training (repeats and epochs counted)
    memory_plan: dict[str, Any] | None = None  # `MemoryPlan.model_dump(mode="json")`
    effect: EffectReport | None = None


def write_report(model_dir: Path, report: TrainingReport) -> Path:
    path = model_dir / REPORT_NAME
    path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    return path
