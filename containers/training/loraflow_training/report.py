"""`training_report.json`: what the run did, for the user and for `record_training` (warnings).

It extends the shared `TrainingReport` contract, so the pipeline Lambda parses it with that model
(extra keys allowed) and reads what the contract names (`warnings`, `output_name`, ...).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraflow_shared.contracts import FiniteFloat, TrainingReport
from loraflow_shared.dataset.config import TrainingConfig
from pydantic import BaseModel, ConfigDict

from loraflow_training.effect import EffectReport

REPORT_NAME = "training_report.json"
MAX_CURVE_POINTS = 200  # a 100k-step run logs 10k interval means: merged down to this many
_MB = 1024 * 1024


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class LossPoint(_Frozen):
    step: int  # the last step of the interval
    loss: FiniteFloat  # mean loss over the interval


class LossSummary(_Frozen):
    """The loss curve as logged: means over logging intervals (the loop syncs with the device only then)."""

    first: FiniteFloat
    last: FiniteFloat
    min: FiniteFloat
    min_step: int
    curve: list[LossPoint]  # interval means, at most MAX_CURVE_POINTS (neighbours merged, weighted by steps)

    @classmethod
    def from_interval_means(cls, points: Sequence[tuple[int, float]]) -> LossSummary | None:
        """`points`: (last step of the interval, mean loss over it), in step order; None when empty."""
        if not points:
            return None
        lowest = min(points, key=lambda point: point[1])
        return cls(
            first=points[0][1],
            last=points[-1][1],
            min=lowest[1],
            min_step=lowest[0],
            curve=_merge(points, MAX_CURVE_POINTS),
        )


def _merge(points: Sequence[tuple[int, float]], limit: int) -> list[LossPoint]:
    """Merge runs of neighbouring intervals so at most `limit` remain, each mean weighted by its steps."""
    group = -(-len(points) // limit)  # ceil
    merged: list[LossPoint] = []
    previous_end = 0
    for start in range(0, len(points), group):
        chunk = points[start : start + group]
        weighted = total = 0.0
        for end, loss in chunk:
            weighted += loss * (end - previous_end)
            total += end - previous_end
            previous_end = end
        merged.append(LossPoint(step=chunk[-1][0], loss=weighted / total if total else chunk[-1][1]))
    return merged


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
    loss: LossSummary | None
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
