"""The LoRA training loop (after diffusers' train_dreambooth_lora.py, with kohya's options).

`train_lora` reads top to bottom: seed, prepare latents and text (cached once where the plan allows),
add the LoRA adapters, build the optimizer and schedule, resume from the latest checkpoint, run the
steps. A step draws one global batch (every data-parallel process draws the same one and trains on its
own rows), adds noise, predicts it and steps the optimizer under accelerate. Nothing in a step waits
for the GPU: losses stay on the device and are read every `LOG_EVERY` steps, where non-finite losses,
progress, the metric log lines and checkpoints are handled. Model-family differences go through
`ModelFamily`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from loraflow_diffusion.families import ModelFamily
from loraflow_shared.contracts import LossPoint
from loraflow_shared.dataset.config import Optimizer as OptimizerName
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode, LoraflowError

from loraflow_training.batching import BatchStream, GlobalBatch, RandomStreams
from loraflow_training.checkpointing import CheckpointStore, global_rng_state, restore_global_rng
from loraflow_training.data import TrainingData
from loraflow_training.loss import NoiseDraw, Objective, build_objective
from loraflow_training.network import (
    LoraDenoiser,
    add_lora,
    enable_gradient_checkpointing,
    load_lora_state,
    lora_state,
    store_denoiser_in_fp8,
    trainable_parameters,
    trained_modules,
)
from loraflow_training.optim import ParamGroup, build_lr_scheduler, build_optimizer
from loraflow_training.progress import ProgressReporter
from loraflow_training.sources import (
    CachedEmbeddings,
    CachedLatents,
    EncodedLatents,
    LatentSource,
    Shard,
    TextSource,
    text_source,
    to_device,
)

LOG_EVERY = 10  # steps between loss reads (the only host syncs), metric lines and NaN checks
DEFAULT_CHECKPOINT_STEPS = 100
DEFAULT_CHECKPOINT_SECONDS = 600.0
CHECKPOINT_FORMAT = 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    """How this run trains, once the memory plan and the hardware have decided the unpinned knobs."""

    batch_size: int  # per process
    optimizer: OptimizerName
    gradient_checkpointing: bool
    cache_latents: bool
    train_text_encoder: bool
    clip_skip: int | None  # None where the family ignores it
    total_steps: int
    checkpoint_every_steps: int = DEFAULT_CHECKPOINT_STEPS
    checkpoint_every_seconds: float | None = DEFAULT_CHECKPOINT_SECONDS
    fp8_base: bool = False  # the frozen denoiser stored in float8, upcast per layer


@dataclass
class Persistence:
    """Checkpoints (read by every process, written by rank 0) and progress (rank 0)."""

    checkpoints: CheckpointStore | None = None
    progress: ProgressReporter | None = None
    progress_interval_s: float = 15.0
    # Set on SIGTERM (SageMaker's stop, a spot interruption): checkpoint at the next sync, then stop.
    stop: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class TrainingOutcome:
    steps: int
    final_loss: float  # mean loss over the last logging interval
    loss_curve: list[LossPoint]  # (last step, mean loss) per logging interval, over processes
    step_losses: list[float]  # every step's loss (mean over processes)
    resumed_from_step: int | None
    images_per_bucket: dict[str, int]  # "WxH" -> images seen, counting repeats and epochs
    epochs: float  # samples seen / samples per epoch


def train_lora(
    pipe: DiffusionPipeline,
    family: ModelFamily,
    data: TrainingData,
    config: TrainingConfig,
    run: RunSettings,
    accelerator: Accelerator,
    persistence: Persistence | None = None,
) -> TrainingOutcome:
    """Train LoRA adapters on `pipe` in place; only the main process writes (checkpoints, progress)."""
    persistence = persistence or Persistence()
    seed_everything(config.seed)
    device = family.denoiser(pipe).device
    randoms = RandomStreams.seeded(config.seed, device)
    latents = _latent_source(pipe, family, data, config, run, randoms)
    text = text_source(pipe, family, data, run.train_text_encoder, run.clip_skip)
    if run.fp8_base:  # before the adapters: only the frozen base layers are stored in float8
        store_denoiser_in_fp8(pipe, family)
    add_lora(pipe, family, config, run.train_text_encoder)
    if run.gradient_checkpointing:
        enable_gradient_checkpointing(pipe, family, run.train_text_encoder)
    _offload_unused(pipe, family, run, text)
    modules = trained_modules(pipe, family, run.train_text_encoder)
    optimizer = build_optimizer(run.optimizer, _param_groups(modules, family, config))
    lr_schedule = build_lr_scheduler(config, optimizer, run.total_steps)
    encoders = [] if isinstance(text, CachedEmbeddings) else family.text_encoders(pipe)
    denoiser = LoraDenoiser(family, family.denoiser(pipe), encoders, run.clip_skip, config.guidance_scale)
    loop = TrainingLoop(
        denoiser=denoiser,
        objective=build_objective(family, pipe, config, device),
        latents=latents,
        text=text,
        batches=BatchStream(data, run.batch_size, accelerator, config.seed),
        randoms=randoms,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        accelerator=accelerator,
        settings=run,
        config=config,
        data=data,
        latent_shape=(family.latent_channels(pipe), pipe.vae_scale_factor),
        persistence=persistence,
        modules=modules,
    )
    start_step = loop.resume()
    return loop.run(start_step)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA; the LoRA's gaussian init draws from it


def _latent_source(
    pipe: DiffusionPipeline,
    family: ModelFamily,
    data: TrainingData,
    config: TrainingConfig,
    run: RunSettings,
    randoms: RandomStreams,
) -> LatentSource:
    if run.cache_latents:
        # Its own generator: the cache is the same whether or not a run resumes.
        generator = torch.Generator(device=family.denoiser(pipe).device).manual_seed(config.seed)
        return CachedLatents(pipe, family, data, config.flip_aug, generator)
    return EncodedLatents(pipe, family, data, randoms.noise)  # per-step samples: the checkpointed stream


def _offload_unused(pipe: DiffusionPipeline, family: ModelFamily, run: RunSettings, text: TextSource) -> None:
    """What the steps never run again leaves the GPU, for the denoiser's sake."""
    unused = []
    if run.cache_latents:
        unused.append("vae")
    if isinstance(text, CachedEmbeddings):
        unused += family.text_encoder_names
    for name in unused:
        getattr(pipe, name).to("cpu")


def _param_groups(modules: dict[str, Any], family: ModelFamily, config: TrainingConfig) -> list[ParamGroup]:
    # kohya's `unet_lr` is the denoiser's learning rate, whichever kind of network it is.
    return [
        ParamGroup(
            name,
            trainable_parameters(module),
            config.unet_learning_rate if name == family.denoiser_name else config.text_encoder_learning_rate,
        )
        for name, module in modules.items()
    ]


@dataclass
class TrainingLoop:
    denoiser: LoraDenoiser
    objective: Objective
    latents: LatentSource
    text: TextSource
    batches: BatchStream
    randoms: RandomStreams
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    accelerator: Accelerator
    settings: RunSettings
    config: TrainingConfig
    data: TrainingData
    latent_shape: tuple[int, int]  # (latent channels, VAE downscale factor)
    persistence: Persistence
    modules: dict[str, Any]
    step_losses: list[float] = field(default_factory=list)
    loss_curve: list[LossPoint] = field(default_factory=list)
    resumed_from_step: int | None = None

    def __post_init__(self) -> None:
        device = torch.device(self.randoms.noise.device)
        self.device = device
        self.is_main = self.accelerator.is_main_process
        self.losses = torch.zeros(self.settings.total_steps, device=device)
        self.sample_weights = _sample_weights(self.data, self.config.prior_loss_weight, device)
        self.trainable = [param for group in self.optimizer.param_groups for param in group["params"]]

    # -- resume ---------------------------------------------------------------------------------

    def resume(self) -> int:
        """Load the latest checkpoint of this run, if any; the step to continue after."""
        store = self.persistence.checkpoints
        saved = store.latest() if store is not None else None
        if saved is None:
            return 0
        step, state = saved  # the store refuses a checkpoint of another LoRA, model or config
        if state.get("format") != CHECKPOINT_FORMAT:
            logger.warning("checkpoint at step %d has another layout: starting from step 0", step)
            return 0
        load_lora_state(self.modules, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.randoms.restore(state["random"])
        restore_global_rng(state["global_random"])
        self.step_losses = [float(loss) for loss in state["step_losses"].tolist()]
        self.loss_curve = [LossPoint(step=int(s), loss=v) for s, v in state["loss_curve"].tolist()]
        self.losses[:step] = state["step_losses"].to(self.device)
        self.batches.skip(int(state["batches_drawn"]))
        self.resumed_from_step = step
        logger.info("resumed_from_step=%d", step)
        return step

    def _checkpoint_state(self, step: int) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "lora": lora_state(self.modules),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "random": self.randoms.state(),
            "global_random": global_rng_state(),
            "batches_drawn": self.batches.drawn,
            "step_losses": torch.tensor(self.step_losses, dtype=torch.float32),
            "loss_curve": torch.tensor([[p.step, p.loss] for p in self.loss_curve], dtype=torch.float64),
        }
        return state

    # -- the steps ------------------------------------------------------------------------------

    def run(self, start_step: int) -> TrainingOutcome:
        model, optimizer = self.accelerator.prepare(self.denoiser, self.optimizer)
        model.train()
        self._last_checkpoint = self._last_progress = time.monotonic()
        self._synced_until = start_step
        for step in range(start_step + 1, self.settings.total_steps + 1):
            for _ in range(self.accelerator.gradient_accumulation_steps):
                self._micro_step(model, optimizer, step)
            self.lr_schedule.step()
            self._between_steps(step)
        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()  # drops the DDP wrapper and accelerate's references
        return self._outcome()

    def _micro_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        with self.accelerator.accumulate(model):
            loss = self._loss(model, self.batches.next())
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.losses[step - 1] += loss.detach() / self.accelerator.gradient_accumulation_steps

    def _loss(self, model: torch.nn.Module, batch: GlobalBatch) -> torch.Tensor:
        shard = self._shard(batch)
        draw = self._draw_noise(batch, shard).rows(batch.rows)
        latents = self.latents.batch(shard)
        noisy, timesteps = self.objective.noisy_latents(latents, draw), self.objective.model_timesteps(draw)
        prediction = model(noisy, timesteps, self.text.batch(shard), shard.bucket)
        weights = None if self.sample_weights is None else self.sample_weights[shard.on_device]
        return self.objective.loss(prediction, self.objective.target(latents, draw), draw.timesteps, weights)

    def _shard(self, batch: GlobalBatch) -> Shard:
        """This process's rows, with host draws made for the whole batch (same in every process)."""
        rng = self.randoms.host
        flips = [rng.random() < 0.5 for _ in batch.indices] if self.config.flip_aug else None
        captions = [self.data.caption(i, rng) for i in batch.indices] if self.data.captions_vary else None
        indices = batch.pick(batch.indices)
        return Shard(
            indices=indices,
            on_device=to_device(indices, self.device),
            bucket=self.data.samples[indices[0]].bucket,
            flips=None if flips is None else batch.pick(flips),
            captions=None if captions is None else batch.pick(captions),
        )

    def _draw_noise(self, batch: GlobalBatch, shard: Shard) -> NoiseDraw:
        channels, factor = self.latent_shape
        width, height = shard.bucket
        shape = torch.Size((len(batch.indices), channels, height // factor, width // factor))
        return self.objective.draw(shape, self.randoms.noise)

    # -- between steps: loss reads, logs, progress, checkpoints ------------------------------------

    def _between_steps(self, step: int) -> None:
        every = self.settings.checkpoint_every_steps
        # A stop is handled at once when alone; with peers, at the next sync point they all reach.
        stop_now = self.accelerator.num_processes == 1 and self.persistence.stop.is_set()
        if step % LOG_EVERY == 0 or step % every == 0 or step == self.settings.total_steps or stop_now:
            self._sync(step)
        elif self.is_main and time.monotonic() - self._last_progress >= self.persistence.progress_interval_s:
            self._report_progress(step, float(self.losses[step - 1].item()))

    def _sync(self, step: int) -> None:
        """Read the losses since the last sync (all processes), fail on a non-finite one, then report."""
        per_step, checkpoint_due, stop = self._gather(step)
        _raise_if_not_finite(per_step, self._synced_until)
        self.step_losses += per_step.tolist()
        self._synced_until = step
        interval = self.step_losses[-_interval_length(step, self.loss_curve) :]
        mean = sum(interval) / len(interval)
        if step % LOG_EVERY == 0 or step == self.settings.total_steps:
            self.loss_curve.append(LossPoint(step=step, loss=mean))
            if self.is_main:
                print(f"step={step} loss={mean:.6f}", flush=True)  # parsed by the job's MetricDefinitions
        if self.is_main:
            self._report_progress(step, mean)
            scheduled = step % self.settings.checkpoint_every_steps == 0 or checkpoint_due or stop
            if scheduled and step < self.settings.total_steps:
                self._save_checkpoint(step)
        if stop and step < self.settings.total_steps:
            raise LoraflowError(
                ErrorCode.TRAINING_FAILED,
                f"stopped (SIGTERM) after step {step}; checkpoint saved, a restarted job resumes there",
            )

    def _gather(self, step: int) -> tuple[torch.Tensor, bool, bool]:
        """Every process's losses since the last sync (averaged), whether rank 0's checkpoint timer is
        due, and whether any process was asked to stop: one collective, so all decide alike."""
        flags = [float(self._checkpoint_time_due()), float(self.persistence.stop.is_set())]
        local = torch.cat([self.losses[self._synced_until : step], torch.tensor(flags, device=self.device)])
        gathered = self.accelerator.gather(local).reshape(self.accelerator.num_processes, -1).cpu()
        return gathered[:, :-2].mean(dim=0), bool(gathered[0, -2]), bool(gathered[:, -1].any())

    def _checkpoint_time_due(self) -> bool:
        seconds = self.settings.checkpoint_every_seconds
        return seconds is not None and time.monotonic() - self._last_checkpoint >= seconds

    def _report_progress(self, step: int, loss: float) -> None:
        self._last_progress = time.monotonic()
        if self.persistence.progress is not None:
            self.persistence.progress.update(step, loss, self.loss_curve)

    def _save_checkpoint(self, step: int) -> None:
        store = self.persistence.checkpoints
        if store is None:
            return
        path = store.save(step, self._checkpoint_state(step))
        self._last_checkpoint = time.monotonic()
        logger.info("checkpoint at step %d: %s", step, path)

    def _outcome(self) -> TrainingOutcome:
        seen = sum(self.batches.images_per_bucket.values())
        return TrainingOutcome(
            steps=self.settings.total_steps,
            final_loss=self.loss_curve[-1].loss if self.loss_curve else float("nan"),
            loss_curve=list(self.loss_curve),
            step_losses=list(self.step_losses),
            resumed_from_step=self.resumed_from_step,
            images_per_bucket=dict(sorted(self.batches.images_per_bucket.items())),
            epochs=round(seen / max(1, len(self.data.epoch_indices())), 3),
        )


def _interval_length(step: int, curve: list[LossPoint]) -> int:
    """Steps since the previous loss-curve point."""
    return step - (curve[-1].step if curve else 0)


def _sample_weights(
    data: TrainingData, prior_loss_weight: float, device: torch.device
) -> torch.Tensor | None:
    """kohya's `prior_loss_weight` on regularization samples; None when every weight is 1."""
    if prior_loss_weight == 1.0 or not any(sample.is_reg for sample in data.samples):
        return None
    weights = [prior_loss_weight if sample.is_reg else 1.0 for sample in data.samples]
    return torch.tensor(weights, dtype=torch.float32, device=device)


def _raise_if_not_finite(per_step: torch.Tensor, first_step_index: int) -> None:
    bad = (~torch.isfinite(per_step)).nonzero()
    if len(bad):
        step = first_step_index + int(bad[0]) + 1
        loss = float(per_step[int(bad[0])])
        raise LoraflowError(
            ErrorCode.NAN_LOSS,
            f"loss became {loss} at step {step}: training stopped, no LoRA delivered "
            '(try a lower learning_rate, or mixed_precision = "bf16" instead of "fp16")',
        )
