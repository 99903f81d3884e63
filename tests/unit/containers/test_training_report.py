"""`training_report.json`: the trainer's full report still parses as the shared contract, the loss curve
summary, and the peak memory measure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from loraflow_shared.contracts import MAX_LOSS_CURVE_POINTS, LossSummary, TrainingReport
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode, Problem
from loraflow_training.effect import WEAK_LORA_THRESHOLD, EffectReport
from loraflow_training.report import (
    REPORT_NAME,
    TrainingReportV2,
    peak_rss_mb,
    write_report,
)
from pydantic import ValidationError

WEAK = Problem(code=ErrorCode.WEAK_LORA, path="", message="the LoRA barely changes images")


def _report(**changes: Any) -> TrainingReportV2:
    fields: dict[str, Any] = {
        "steps": 30,
        "final_loss": 0.12,
        "seconds": 41.5,
        "ignored_keys": ["xformers"],
        "warnings": [WEAK],
        "output_name": "my-lora",
        "epochs": 2,
        "peak_rss_mb": 812.5,
        "peak_cuda_mb": None,
        "job_id": "job-1",
        "base_model": "s3://models/tiny/",
        "model_family": "sd15",
        "device": "cpu",
        "dtype": "float32",
        "config": TrainingConfig.model_validate({"resolution": 64, "train_batch_size": 2}),
        "lora_files": ["pytorch_lora_weights.safetensors", "my-lora.safetensors"],
        "trained_components": ["unet", "text_encoder"],
        "loss": LossSummary.from_interval_means([(10, 0.3), (20, 0.2), (30, 0.12)]),
        "images": 7,
        "images_per_subset": {"3_ohwx": 3, "2_sks dog": 4},
        "repeats": {"3_ohwx": 3, "2_sks dog": 2},
        "samples_per_epoch": 17,
        "images_per_bucket": {"64x64": 60},
        "memory_plan": {"batch_size": 2, "reasons": ["no GPU: CPU defaults"]},
        "effect": EffectReport(
            mean_abs_difference=0.001,
            per_prompt={"ohwx": 0.001},
            threshold=WEAK_LORA_THRESHOLD,
            steps=4,
            resolution=(64, 64),
            seed=0,
        ),
    }
    return TrainingReportV2.model_validate(fields | changes)


def test_given_full_report_when_written_then_shared_contract_parses_it(tmp_path: Path) -> None:
    path = write_report(tmp_path, _report())

    shared = TrainingReport.model_validate_json(path.read_text(encoding="utf-8"))

    assert path.name == REPORT_NAME
    assert (shared.steps, shared.final_loss, shared.ignored_keys) == (30, 0.12, ["xformers"])
    assert shared.warnings == [WEAK]
    assert (shared.output_name, shared.epochs, shared.peak_rss_mb) == ("my-lora", 2, 812.5)
    extra = shared.model_extra or {}
    assert extra["config"]["train_batch_size"] == 2 and extra["config"]["resolution"] == [64, 64]
    assert extra["images_per_bucket"] == {"64x64": 60}
    assert extra["effect"]["weak"] is True
    assert shared.loss is not None and shared.loss.min == 0.12  # the contract's own now (the loss curve)


def test_given_written_report_when_read_back_then_equal(tmp_path: Path) -> None:
    report = _report(resumed_from_step=10)

    path = write_report(tmp_path, report)

    assert TrainingReportV2.model_validate_json(path.read_text(encoding="utf-8")) == report


def test_given_interval_means_when_summarised_then_first_last_and_minimum() -> None:
    summary = LossSummary.from_interval_means([(10, 0.5), (20, 0.1), (30, 0.2)])

    assert summary is not None
    assert (summary.first, summary.last, summary.min, summary.min_step) == (0.5, 0.2, 0.1, 20)
    assert [(point.step, point.loss) for point in summary.curve] == [(10, 0.5), (20, 0.1), (30, 0.2)]


def test_given_no_logged_interval_when_summarised_then_none() -> None:
    assert LossSummary.from_interval_means([]) is None


def test_given_long_run_when_summarised_then_curve_merged_to_limit_weighted_by_steps() -> None:
    # 1000 intervals of 10 steps, loss falling linearly from 1.0; then one short last interval of 5 steps.
    points = [(10 * (i + 1), 1.0 - i / 1000) for i in range(1000)] + [(10_005, 0.0)]

    summary = LossSummary.from_interval_means(points)

    assert summary is not None
    assert len(summary.curve) <= MAX_LOSS_CURVE_POINTS
    assert summary.curve[-1].step == 10_005 and summary.curve[0].step == 60  # groups of 6 intervals
    assert summary.curve[0].loss == pytest.approx(sum(1.0 - i / 1000 for i in range(6)) / 6)
    merged_mean = sum(p.loss * (p.step - prev) for p, prev in _with_previous_steps(summary.curve)) / 10_005
    exact_mean = (sum(10 * loss for _, loss in points[:-1]) + 5 * 0.0) / 10_005
    assert merged_mean == pytest.approx(exact_mean)


def _with_previous_steps(curve: list[Any]) -> list[tuple[Any, int]]:
    return [(point, curve[i - 1].step if i else 0) for i, point in enumerate(curve)]


def test_given_non_finite_loss_when_reported_then_rejected() -> None:
    with pytest.raises(ValidationError, match="finite"):
        LossSummary.from_interval_means([(10, 0.5), (20, float("nan"))])


def test_given_this_process_when_peak_rss_measured_then_plausible_megabytes() -> None:
    peak = peak_rss_mb()

    assert 20 < peak < 64 * 1024  # a Python process with torch loaded; not bytes, not KiB
