"""After the last step (main process only): the LoRA files, the effect check and the training report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from loraflow_diffusion.device import peak_device_memory_bytes
from loraflow_diffusion.families import ModelFamily, SupportedPipeline
from loraflow_shared.contracts import LossSummary
from loraflow_shared.dataset.config import ParsedConfig, TrainingConfig
from loraflow_shared.errors import Problem

from loraflow_training.data import TrainingData
from loraflow_training.effect import lora_effect
from loraflow_training.kohya import LoraMetadataInputs
from loraflow_training.memory_plan import MemoryPlan
from loraflow_training.outputs import SavedLora, save_lora
from loraflow_training.report import TrainingReportV2, peak_rss_mb, write_report
from loraflow_training.resolve import applied_config
from loraflow_training.settings import Hyperparameters
from loraflow_training.train import RunSettings, TrainingOutcome

EFFECT_STEPS = 4  # denoising steps per effect render: enough to see the LoRA, cheap after training


@dataclass(frozen=True)
class RunFacts:
    hyperparameters: Hyperparameters
    parsed: ParsedConfig
    data: TrainingData
    plan: MemoryPlan
    run: RunSettings
    adjusted: list[Problem]  # SETTING_ADJUSTED warnings
    outcome: TrainingOutcome
    started_at: datetime
    seconds: float
    processes: int


def write_outputs(model_dir: Path, pipe: SupportedPipeline, family: ModelFamily, facts: RunFacts) -> Path:
    """Save the LoRA (both formats), measure its effect, write the report; the report's path."""
    model_dir.mkdir(parents=True, exist_ok=True)
    config = applied_config(facts.parsed.config, facts.run)
    saved = save_lora(model_dir, pipe, config.output_name, _metadata_inputs(config, facts))
    training_prompts = [sample.caption for sample in facts.data.samples if not sample.is_reg]
    effect = lora_effect(pipe, training_prompts, config.seed, EFFECT_STEPS, config.resolution)
    weak = effect.warning()
    report = _report(config, pipe, family, facts, saved, [*facts.adjusted, *([weak] if weak else [])])
    return write_report(model_dir, report.model_copy(update={"effect": effect}))


def _report(
    config: TrainingConfig,
    pipe: SupportedPipeline,
    family: ModelFamily,
    facts: RunFacts,
    saved: SavedLora,
    warnings: list[Problem],
) -> TrainingReportV2:
    outcome, data = facts.outcome, facts.data
    denoiser = family.denoiser(pipe)
    peak_cuda = peak_device_memory_bytes(denoiser.device)
    return TrainingReportV2(
        steps=outcome.steps,
        final_loss=outcome.final_loss,
        seconds=round(facts.seconds, 3),
        ignored_keys=facts.parsed.ignored_keys,
        warnings=warnings,
        peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=None if peak_cuda is None else round(peak_cuda / 2**20, 1),
        output_name=config.output_name,
        epochs=math.ceil(outcome.epochs),
        job_id=facts.hyperparameters.job_id,
        base_model=facts.hyperparameters.base_model,
        model_family=family.name,
        device=denoiser.device.type,
        dtype=str(denoiser.dtype).removeprefix("torch."),
        processes=facts.processes,
        config=config,
        lora_files=[saved.diffusers_file.name, saved.kohya_file.name],
        trained_components=list(saved.components),
        resumed_from_step=outcome.resumed_from_step,
        loss=LossSummary.from_interval_means([(p.step, p.loss) for p in outcome.loss_curve]),
        images=sum(1 for sample in data.samples if not sample.is_reg),
        reg_images=sum(1 for sample in data.samples if sample.is_reg),
        images_per_subset=data.images_by_subset(),
        repeats=data.repeats_by_subset(),
        samples_per_epoch=len(data.epoch_indices()),
        images_per_bucket=outcome.images_per_bucket,
        memory_plan=facts.plan.model_dump(mode="json"),
    )


def _metadata_inputs(config: TrainingConfig, facts: RunFacts) -> LoraMetadataInputs:
    captions: dict[str, list[str]] = {}
    for sample in facts.data.samples:
        captions.setdefault(sample.subset, []).append(sample.caption)
    return LoraMetadataInputs(
        config=config,
        base_model=facts.hyperparameters.base_model,
        steps=facts.outcome.steps,
        epochs=math.ceil(facts.outcome.epochs),
        started_at=facts.started_at,
        finished_at=datetime.now(UTC),
        captions_by_subset=captions,
        reg_subsets={sample.subset for sample in facts.data.samples if sample.is_reg},
    )
