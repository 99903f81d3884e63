"""What `record_training` keeps of a training job's `model.tar.gz`, and what it makes of the report.

The archive holds the diffusers-format LoRA, its kohya-format copy `<output_name>.safetensors` and
`training_report.json`. Members are streamed once in archive order, so which file is the kohya one
is decided after the copy, from the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from loraflow_shared.contracts import TrainingReport
from loraflow_shared.errors import Problem
from loraflow_shared.jobs.model import TrainingSummary, job_prefix
from loraflow_shared.s3 import s3_uri

LORA_FILENAME = "pytorch_lora_weights.safetensors"
REPORT_FILENAME = "training_report.json"
WEIGHTS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class OutputLocations:
    """Where one job's training outputs are published in the artifacts bucket."""

    lora_prefix: str  # s3://<bucket>/jobs/<job_id>/lora/
    report_uri: str

    @classmethod
    def for_job(cls, bucket: str, job_id: str) -> OutputLocations:
        return cls(
            lora_prefix=s3_uri(bucket, f"{job_prefix(job_id)}lora/"),
            report_uri=s3_uri(bucket, job_prefix(job_id) + REPORT_FILENAME),
        )

    @property
    def diffusers_lora_uri(self) -> str:
        return self.lora_prefix + LORA_FILENAME

    def destination_for(self, member: str) -> str | None:
        """The report, and every top-level `.safetensors` file (the LoRA in each format); nothing else."""
        if member == REPORT_FILENAME:
            return self.report_uri
        if "/" not in member and member.endswith(WEIGHTS_SUFFIX):
            return self.lora_prefix + member
        return None


def kohya_member(report: TrainingReport, copied: Iterable[str]) -> str | None:
    """The kohya-format file among the copied members: `<output_name>.safetensors` when the report
    names it, else the only `.safetensors` file besides the diffusers one; None when there is none
    (or several and the report does not say which)."""
    weights = {name for name in copied if name.endswith(WEIGHTS_SUFFIX) and name != LORA_FILENAME}
    if report.output_name is not None and f"{report.output_name}{WEIGHTS_SUFFIX}" in weights:
        return f"{report.output_name}{WEIGHTS_SUFFIX}"
    return weights.pop() if len(weights) == 1 else None


def training_summary(job_name: str, report: TrainingReport) -> TrainingSummary:
    return TrainingSummary(
        job_name=job_name,
        steps=report.steps,
        final_loss=report.final_loss,
        seconds=report.seconds,
        epochs=report.epochs,
        peak_rss_mb=report.peak_rss_mb,
        peak_cuda_mb=report.peak_cuda_mb,
        loss_curve=[] if report.loss is None else report.loss.curve,
    )


def merge_warnings(existing: Iterable[Problem], added: Iterable[Problem]) -> list[Problem]:
    """`existing` then the new ones, each once: a retried step must not list a warning twice."""
    merged: dict[Problem, None] = dict.fromkeys(existing)
    merged.update(dict.fromkeys(added))
    return list(merged)


def missing_members(copied: Mapping[str, str]) -> list[str]:
    return [name for name in (LORA_FILENAME, REPORT_FILENAME) if name not in copied]
