"""How fast does the trainer step, how much of a step is overhead, how much memory does it take?

Every number comes from real runs of `python -m loraflow_training train` (a subprocess with SageMaker's
directory layout, as the local cloud runs it) on every family's tiny pipeline (`tiny_models`), on the CPU.

- Time per optimizer step: two runs that differ only in `max_train_steps`; the difference of their
  `training_report.json` seconds over the difference of steps. Setup (loading, latent caching) cancels.
- Step overhead: that time (denoiser-only runs) over a bare forward+backward of the same denoiser through
  the family's `predict`, with the same LoRA adapters, at the same batch shape (latents, conditioning and
  the objective's draw given), timed in this process.
- Peak RSS: the training process's, from `os.wait4` (this child's own rusage, not the max of all children).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loraflow_diffusion.families import family_named, family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny_models import TINY_MODELS, build_tiny_models
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_training.loss import build_objective
from peft import LoraConfig
from PIL import Image

THREADS = 1  # torch threads, here and in the trainer (OMP_NUM_THREADS): steadier on a shared machine
BATCH = 4
RESOLUTION = 64
RANK = 4
IMAGES = 8
SHORT_STEPS, LONG_STEPS = 20, 220
REPEATS = 2  # each trainer run and bare block is repeated; the fastest counts (contention only adds time)
BARE_WARMUP, BARE_BLOCKS, BARE_BLOCK_ITERATIONS = 5, 6, 20
CONFIG_FILE = "config.toml"
CONFIG = """\
[training_arguments]
resolution = {resolution}
max_train_steps = {steps}
train_batch_size = {batch}
learning_rate = 1e-4
seed = 0
mixed_precision = "no"
# The tiny FLUX.1's T5 pads every caption to this (ignored, with a warning, by the other families).
t5xxl_max_token_length = {t5_tokens}
{extra}

[network_arguments]
network_dim = {rank}
network_alpha = {rank}
"""
UNET_ONLY = "network_train_unet_only = true"
T5_TOKENS = 64


@dataclass(frozen=True)
class TrainerRun:
    steps: int
    seconds: float  # the report's: start to the last step (the effect check and file writes not counted)
    peak_rss_mb: float
    trained: list[str]  # the report's trained_components, e.g. ["unet", "text_encoder"]

    @property
    def lora_on(self) -> str:
        return " + ".join(self.trained)


@dataclass(frozen=True)
class StepTiming:
    seconds_per_step: float
    short: TrainerRun
    long: TrainerRun

    @property
    def steps_per_second(self) -> float:
        return 1.0 / self.seconds_per_step


def run() -> list[dict[str, Any]]:
    torch.set_num_threads(THREADS)
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-training-") as folder:
        root = Path(folder)
        for model in build_tiny_models(root / "models"):
            entries += _family_entries(root / model.name, model)
    return [*entries, *_gpu_entries()]


def _family_entries(root: Path, model: Path) -> list[dict[str, Any]]:
    """Overhead (denoiser-only runs), steps/s and peak RSS (default plan) of one family's tiny model."""
    tag, label = model.name.removeprefix("tiny-"), TINY_MODELS[model.name][0]
    denoiser_only = time_steps(root / "denoiser-only", model, UNET_ONLY)
    bare = bare_denoiser_step_seconds(model)
    # A family whose text encoders never train runs the same plan either way: measured once.
    trains_text = family_named(label).text_encoders_trainable
    default = time_steps(root / "default", model) if trains_text else denoiser_only
    return [
        _overhead_entry(tag, label, denoiser_only, bare),
        _speed_entry(f"train_steps_per_second_tiny_{tag}", default, f"tiny {label}"),
        _rss_entry(tag, label, default.long),
    ]


def time_steps(root: Path, model: Path, extra: str = "") -> StepTiming:
    short = fastest_run(root / "short", model, SHORT_STEPS, extra)
    long = fastest_run(root / "long", model, LONG_STEPS, extra)
    per_step = (long.seconds - short.seconds) / (LONG_STEPS - SHORT_STEPS)
    if per_step <= 0:
        raise RuntimeError(f"longer run was not slower: {short} vs {long}")
    return StepTiming(per_step, short, long)


def fastest_run(root: Path, model: Path, steps: int, extra: str) -> TrainerRun:
    runs = [run_trainer(root / str(attempt), model, steps, extra) for attempt in range(REPEATS)]
    return min(runs, key=lambda run: run.seconds)


def run_trainer(root: Path, model: Path, steps: int, extra: str = "") -> TrainerRun:
    """One `python -m loraflow_training train` in a fresh SageMaker layout; fails loudly on exit != 0."""
    dataset = write_dataset(root / "input" / "data" / "dataset", steps, extra)
    config_dir = root / "input" / "config"
    config_dir.mkdir(parents=True)
    hyperparameters = {"config_file": CONFIG_FILE, "base_model": str(model), "job_id": "bench"}
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters), encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SM_", "LORAFLOW_"))}
    env |= sagemaker_layout(root, dataset) | {"OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    log = root / "training.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "loraflow_training", "train"], env=env, stdout=sink, stderr=sink
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"training failed ({process.returncode}):\n{log.read_text()[-3000:]}")
    report = json.loads((root / "model" / "training_report.json").read_text(encoding="utf-8"))
    peak_kib = usage.ru_maxrss  # Linux: KiB (macOS would be bytes; the bench runs on Linux)
    return TrainerRun(
        steps,
        float(report["seconds"]),
        round(peak_kib / 1024, 1),
        report["trained_components"],
    )


def sagemaker_layout(root: Path, dataset: Path) -> dict[str, str]:
    """SageMaker's /opt/ml paths under `root` (the `SM_*` overrides `TrainingPaths` reads)."""
    return {
        "SM_INPUT_DIR": str(root / "input"),
        "SM_INPUT_CONFIG_DIR": str(root / "input" / "config"),
        "SM_CHANNEL_DATASET": str(dataset),
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DIR": str(root / "output"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
    }


def write_dataset(dataset: Path, steps: int, extra: str) -> Path:
    """`IMAGES` generated images at the training resolution (one bucket), captioned by the folder."""
    folder = dataset / "1_bnch"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        pixels = rng.integers(0, 255, size=(RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img{index}.png")
    config = CONFIG.format(
        resolution=RESOLUTION, steps=steps, batch=BATCH, rank=RANK, t5_tokens=T5_TOKENS, extra=extra
    )
    (dataset / CONFIG_FILE).write_text(config, encoding="utf-8")
    return dataset


def bare_denoiser_step_seconds(model: Path) -> float:
    """Forward + backward of the tiny model's denoiser with LoRA adapters like the trainer's, batch `BATCH`,
    through the family's `predict` (packing, position ids, guidance: what every step must do)."""
    cpu = torch.device("cpu")
    config = TrainingConfig(t5xxl_max_token_length=T5_TOKENS, resolution=(RESOLUTION, RESOLUTION))
    pipe = load_pipeline(str(model), device=cpu, dtype=torch.float32, cache_dir=model / ".cache")
    family = family_of(pipe)
    family.adopt_config(pipe, config)
    denoiser = family.denoiser(pipe)
    denoiser.requires_grad_(False)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        init_lora_weights="gaussian",
        target_modules=list(family.denoiser_target_modules),
    )
    denoiser.add_adapter(lora)
    denoiser.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = family.encode_prompts(pipe, ["bnch"] * BATCH, (RESOLUTION, RESOLUTION))
    side = RESOLUTION // pipe.vae_scale_factor
    latents = torch.randn((BATCH, family.latent_channels(pipe), side, side), generator=generator)
    objective = build_objective(family, pipe, config, cpu)
    draw = objective.draw(latents.shape, generator)
    noisy, timesteps = objective.noisy_latents(latents, draw), objective.model_timesteps(draw)
    target = objective.target(latents, draw)

    def step() -> None:
        prediction = family.predict(denoiser, noisy, timesteps, cond)
        torch.nn.functional.mse_loss(prediction, target).backward()
        denoiser.zero_grad(set_to_none=True)

    for _ in range(BARE_WARMUP):
        step()
    block_means = []
    for _ in range(BARE_BLOCKS * REPEATS):
        started = time.perf_counter()
        for _ in range(BARE_BLOCK_ITERATIONS):
            step()
        block_means.append((time.perf_counter() - started) / BARE_BLOCK_ITERATIONS)
    return min(block_means)


def _shape() -> str:
    return f"batch {BATCH}, {RESOLUTION}x{RESOLUTION}, LoRA rank {RANK}, fp32, {THREADS} torch thread(s)"


def _overhead_entry(tag: str, family: str, timing: StepTiming, bare_seconds: float) -> dict[str, Any]:
    return {
        "name": f"train_step_overhead_tiny_{tag}",
        "value": round(timing.seconds_per_step / bare_seconds, 3),
        "unit": "ratio",
        "target": 1.15,
        "notes": (
            f"trainer time per optimizer step {timing.seconds_per_step * 1000:.1f} ms (runs of "
            f"{SHORT_STEPS} and {LONG_STEPS} steps differenced, fastest of {REPEATS} each; LoRA on "
            f"{timing.long.lora_on} only, cached latents and text embeddings, default checkpoint "
            f"cadence) / bare denoiser+LoRA forward+backward through the family's predict "
            f"{bare_seconds * 1000:.1f} ms (fastest of {BARE_BLOCKS * REPEATS} means of "
            f"{BARE_BLOCK_ITERATIONS}); tiny {family}, {_shape()}, CPU"
        ),
    }


def _rss_entry(tag: str, family: str, run: TrainerRun) -> dict[str, Any]:
    return {
        "name": f"train_peak_rss_mb_tiny_{tag}",
        "value": run.peak_rss_mb,
        "unit": "MiB",
        "target": None,
        "notes": (
            f"peak RSS of the whole training process (os.wait4), {run.steps}-step run of the tiny {family}, "
            f"{_shape()}, default CPU plan (LoRA on {run.lora_on}); includes the imports and the "
            "post-training effect renders"
        ),
    }


def _speed_entry(name: str, timing: StepTiming, model: str) -> dict[str, Any]:
    return {
        "name": name,
        "value": round(timing.steps_per_second, 2),
        "unit": "steps/s",
        "target": None,
        "notes": (
            f"{model}, {_shape()}, CPU, default CPU memory plan (LoRA on {timing.long.lora_on}); runs of "
            f"{SHORT_STEPS} and {LONG_STEPS} steps differenced, fastest of {REPEATS} each "
            f"({timing.short.seconds:.1f} s, "
            f"{timing.long.seconds:.1f} s), so model loading and latent caching are not counted"
        ),
    }


def _gpu_entries() -> list[dict[str, Any]]:
    """The GPU targets of the issue, recorded as not measured: nothing here measures them yet."""
    reason = (
        "not measured: no CUDA device in this environment"
        if not torch.cuda.is_available()
        else "not measured: a GPU is present but this benchmark has no GPU measurement yet"
    )
    targets = [
        ("gpu_train_steps_per_second_sd15_512", 6, "steps/s", "SD 1.5-shaped UNet, 512x512, batch 1, H100"),
        ("gpu_train_peak_mb_sd15_512", 8192, "MiB", "SD 1.5-shaped UNet, 512x512, batch 1, H100"),
        ("gpu_train_steps_per_second_sdxl_1024", 2, "steps/s", "SDXL-shaped UNet, 1024x1024, batch 1, H100"),
        ("gpu_train_peak_mb_sdxl_1024", 16384, "MiB", "SDXL-shaped UNet, 1024x1024, batch 1, H100"),
    ]
    return [
        {"name": name, "value": None, "unit": unit, "target": target, "notes": f"{what}; {reason}"}
        for name, target, unit, what in targets
    ]
