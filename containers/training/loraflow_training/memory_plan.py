"""Memory plan: which memory-saving knobs a LoRA run takes so that it fits the GPU.

The estimate of the training-phase peak on a CUDA device (bytes), term by term:

- CUDA context, cuBLAS/cuDNN workspaces: ``CUDA_OVERHEAD_BYTES``.
- Frozen weights on the device: parameters * bytes per parameter of the weight dtype (4 for
  ``mixed_precision = "no"``, 2 for fp16/bf16). The UNet always; the text encoders when their LoRA is
  trained or captions vary per step (shuffle/dropout: embeddings can't be cached, the encoders run each
  step); the VAE when latents are not cached (in fp32 for SDXL, whose VAE config forces upcasting).
- Trainable LoRA parameters (rank * the family's LoRA parameters per rank; text encoders' when trained)
  * (4 bytes fp32 master weight + 4 bytes gradient + optimizer state): AdamW 8 (two fp32 moments),
  AdamW8bit 2 (two 8-bit moments; block statistics are negligible), Adafactor ~ 4 / rank (no first
  moment; the second moment of each r x d matrix is factored into r + d floats, and d >> r).
- Per image of a batch, * ``FRAGMENTATION``: the denoiser's activations, measured at the family's reference
  resolution and scaled by area (attention runs as flash/memory-efficient SDPA, linear in tokens) and by
  compute-dtype bytes / 2, with or without gradient checkpointing; the text encoders' when trained;
  VAE encoding when latents are not cached.

The plan must fit ``BUDGET_FRACTION`` of the device memory. Knobs the config leaves unpinned (None)
start at the fastest setting and are turned, cheapest first, until the estimate fits: latent caching
(always on unless pinned off: it costs nothing here, since images are not randomly cropped and flipped
latents are cached too, and it takes the VAE off the GPU) → gradient checkpointing → AdamW8bit (only
with CUDA + bitsandbytes) → UNet-only training → batch size down to 1. A plan that still does not fit
says so in ``reasons`` and names the pinned values that cost memory; training is attempted anyway,
and an out-of-memory failure then reports the plan (``oom.py``).

Each family's specification carries its ``Footprint`` (measured on its reference model with its LoRA
targets). Not counted: cached latents (64 KiB per image at 512², twice that with flip_aug), small
beside the 10% margin for datasets of hundreds of images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from loraflow_diffusion.families import Footprint
from loraflow_shared.dataset.config import Optimizer, TrainingConfig
from pydantic import BaseModel, ConfigDict

GIB = 1024**3
MIB = 1024**2
BUDGET_FRACTION = 0.9
CUDA_OVERHEAD_BYTES = 1 * GIB  # context (~0.5 GiB on recent GPUs) plus library workspaces
FRAGMENTATION = 1.2  # PyTorch's caching allocator holds more than the live tensors
# kohya's default is 1, which leaves most of a GPU idle; the plan lowers this when memory is short.
PREFERRED_GPU_BATCH_SIZE = 4
WEIGHT_BYTES = {"no": 4, "fp16": 2, "bf16": 2}  # by mixed_precision: the frozen weights' dtype
FP8_BYTES = 1  # a frozen denoiser weight under fp8_base (float8 e4m3)
TRAINABLE_BYTES = 4 + 4  # fp32 master weight + fp32 gradient, per trainable (LoRA) parameter
ADAM_STATE_BYTES: dict[Optimizer, float] = {"AdamW": 8.0, "AdamW8bit": 2.0}


class MemoryPlan(BaseModel):
    """The knobs a run trains with, the estimate behind them, and why (recorded in the report)."""

    model_config = ConfigDict(frozen=True)

    gradient_checkpointing: bool
    optimizer: Optimizer
    cache_latents: bool
    train_unet_only: bool
    batch_size: int
    fp8_base: bool = False  # the frozen denoiser stored in float8 (plans from before it: False)
    device_memory_bytes: int | None  # None: no GPU (trained on the CPU)
    estimated_peak_bytes: int
    fits: bool  # the estimate is within BUDGET_FRACTION of the device memory (always True on the CPU)
    reasons: list[str]
    pinned: list[str]  # config keys that fixed a knob, e.g. ["train_batch_size"]
    estimate_breakdown: dict[str, int]  # the estimate's terms, bytes

    def describe(self) -> str:
        """One line naming every knob, the estimate and the device, for logs and failure messages."""
        on_off = {True: "on", False: "off"}
        device = "no GPU" if self.device_memory_bytes is None else f"{_gib(self.device_memory_bytes)} GPU"
        pinned = f", pinned: {', '.join(self.pinned)}" if self.pinned else ""
        return (
            f"batch_size={self.batch_size}, gradient_checkpointing={on_off[self.gradient_checkpointing]}, "
            f"optimizer={self.optimizer}, cache_latents={on_off[self.cache_latents]}, "
            f"train_unet_only={on_off[self.train_unet_only]}, fp8_base={on_off[self.fp8_base]}; "
            f"estimated peak "
            f"{_gib(self.estimated_peak_bytes)} on a {device}{pinned}"
        )


@dataclass(frozen=True)
class Knobs:
    cache_latents: bool
    gradient_checkpointing: bool
    optimizer: Optimizer
    train_unet_only: bool
    batch_size: int
    fp8_base: bool = False


@dataclass(frozen=True)
class _Job:
    """What the estimate needs besides the knobs."""

    footprint: Footprint
    weight_bytes: int  # per frozen parameter and per activation element (compute dtype)
    network_dim: int
    area_scale: float  # training area / reference area
    captions_vary: bool
    on_gpu: bool
    eight_bit_runs: bool  # AdamW8bit can run; without, the trainer falls back to AdamW


def plan_memory(
    config: TrainingConfig,
    footprint: Footprint,
    resolution: tuple[int, int],
    device_memory_bytes: int | None,
    bitsandbytes_available: bool,
) -> MemoryPlan:
    """The knobs for this run. ``resolution``: the largest (width, height) trained (bucketing included).

    ``device_memory_bytes`` is the GPU's total memory, None on the CPU; ``bitsandbytes_available``
    means AdamW8bit can run (CUDA and bitsandbytes).
    """
    on_gpu = device_memory_bytes is not None
    job = _Job(
        footprint=footprint,
        weight_bytes=WEIGHT_BYTES[config.mixed_precision] if on_gpu else 4,  # the CPU trains in fp32
        network_dim=config.network_dim,
        area_scale=resolution[0] * resolution[1] / footprint.reference_side**2,
        captions_vary=config.shuffle_caption or config.caption_dropout_rate > 0,
        on_gpu=on_gpu,
        eight_bit_runs=bitsandbytes_available,
    )
    pinned = pinned_keys(config)
    knobs = _starting_knobs(config, on_gpu, _text_trainable(footprint))
    reasons = _pin_notes(config, bitsandbytes_available)
    if device_memory_bytes is None:
        reasons.insert(
            0, "no GPU: trained on the CPU in fp32, nothing to fit; no memory-saving knob is taken"
        )
        return _plan(knobs, job, None, True, reasons, pinned)
    budget = int(device_memory_bytes * BUDGET_FRACTION)
    turns = _turnable(config, bitsandbytes_available, _text_trainable(footprint))
    knobs, taken = _fit(knobs, job, budget, turns)
    reasons += taken
    fits = estimate_breakdown(knobs, job)["total"] <= budget
    reasons.append(_verdict(knobs, job, budget, device_memory_bytes, fits, config))
    return _plan(knobs, job, device_memory_bytes, fits, reasons, pinned)


def pinned_keys(config: TrainingConfig) -> list[str]:
    """The config keys that fix a knob (set to anything but None)."""
    values = {
        "cache_latents": config.cache_latents,
        "gradient_checkpointing": config.gradient_checkpointing,
        "optimizer_type": config.optimizer_type,
        "network_train_unet_only": config.network_train_unet_only,
        "train_batch_size": config.train_batch_size,
        "fp8_base": config.fp8_base,
    }
    return [key for key, value in values.items() if value is not None]


def _text_trainable(footprint: Footprint) -> bool:
    """A family whose text encoders take no LoRA (LLM encoders) trains the denoiser alone, always."""
    return footprint.text_encoder_lora_params_per_rank > 0


def _starting_knobs(config: TrainingConfig, on_gpu: bool, text_trainable: bool) -> Knobs:
    """Pinned values as they are; the rest at their fastest (the CPU trains one image at a time)."""
    default_batch = PREFERRED_GPU_BATCH_SIZE if on_gpu else 1
    return Knobs(
        cache_latents=True if config.cache_latents is None else config.cache_latents,
        gradient_checkpointing=bool(config.gradient_checkpointing),
        optimizer=config.optimizer_type or "AdamW",
        train_unet_only=bool(config.network_train_unet_only) or not text_trainable,
        batch_size=config.train_batch_size or default_batch,
        fp8_base=bool(config.fp8_base),
    )


Turn = Callable[[Knobs], Knobs | None]  # the knobs with one more saving taken, None when none is left


def _turnable(
    config: TrainingConfig, bitsandbytes_available: bool, text_trainable: bool
) -> list[tuple[str, Turn]]:
    """The unpinned knobs, cheapest first, each as a function taking its saving."""
    turns: list[tuple[str, Turn]] = []
    if config.gradient_checkpointing is None:
        turns.append(("gradient_checkpointing on", _with(gradient_checkpointing=True)))
    if config.optimizer_type is None and bitsandbytes_available:
        turns.append(("optimizer AdamW8bit", _with(optimizer="AdamW8bit")))
    if config.network_train_unet_only is None and text_trainable:
        turns.append(("UNet-only training (text encoders not trained)", _with(train_unet_only=True)))
    if config.train_batch_size is None:
        turns.append(("batch", _smaller_batch))
    # Last: the only saving that changes the frozen weights the LoRA learns against (float8 rounding).
    if config.fp8_base is None:
        turns.append(("fp8 base (the frozen denoiser stored in float8)", _with(fp8_base=True)))
    return turns


def _with(**change: object) -> Turn:
    """A saving taken at most once."""

    def turn(knobs: Knobs) -> Knobs | None:
        if all(getattr(knobs, key) == value for key, value in change.items()):
            return None
        return dataclasses.replace(knobs, **change)  # type: ignore[arg-type]

    return turn


def _smaller_batch(knobs: Knobs) -> Knobs | None:
    return dataclasses.replace(knobs, batch_size=knobs.batch_size - 1) if knobs.batch_size > 1 else None


def _fit(knobs: Knobs, job: _Job, budget: int, turns: list[tuple[str, Turn]]) -> tuple[Knobs, list[str]]:
    """Take savings in order until the estimate fits the budget; a reason for each one taken."""
    reasons: list[str] = []
    for name, turn in turns:
        before = knobs
        while estimate_breakdown(knobs, job)["total"] > budget and (turned := turn(knobs)) is not None:
            knobs = turned
        if knobs != before:
            taken = f"batch size {before.batch_size} -> {knobs.batch_size}" if name == "batch" else name
            estimate = _gib(estimate_breakdown(before, job)["total"])
            reasons.append(f"{taken}: the estimate before was {estimate}, over the {_gib(budget)} budget")
    return knobs, reasons


def estimate_breakdown(knobs: Knobs, job: _Job) -> dict[str, int]:
    """The estimate's terms in bytes (see the module docstring), and their ``total``."""
    fp = job.footprint
    trains_text = not knobs.train_unet_only
    text_on_device = trains_text or job.captions_vary
    vae_bytes = 4 if fp.vae_upcast else job.weight_bytes
    frozen = fp.denoiser_params * (FP8_BYTES if knobs.fp8_base else job.weight_bytes)
    frozen += fp.text_encoder_params * job.weight_bytes if text_on_device else 0
    frozen += 0 if knobs.cache_latents else fp.vae_params * vae_bytes
    lora_params = job.network_dim * (
        fp.denoiser_lora_params_per_rank + (fp.text_encoder_lora_params_per_rank if trains_text else 0)
    )
    optimizer = knobs.optimizer if job.eight_bit_runs or knobs.optimizer != "AdamW8bit" else "AdamW"
    optimizer_bytes = ADAM_STATE_BYTES.get(optimizer, 4.0 / job.network_dim)  # else Adafactor
    dtype_scale = job.weight_bytes / 2  # activations were measured in fp16
    unet = (
        fp.denoiser_checkpointed_activation_bytes
        if knobs.gradient_checkpointing
        else fp.denoiser_activation_bytes
    )
    per_image = unet * job.area_scale * dtype_scale
    per_image += fp.text_encoder_activation_bytes * dtype_scale if trains_text else 0
    per_image += 0 if knobs.cache_latents else fp.vae_encode_bytes * job.area_scale * vae_bytes / 2
    terms = {
        "device_overhead": CUDA_OVERHEAD_BYTES if job.on_gpu else 0,
        "frozen_weights": frozen,
        "lora_training_state": int(lora_params * (TRAINABLE_BYTES + optimizer_bytes)),
        "activations": int(knobs.batch_size * per_image * FRAGMENTATION),
    }
    return {**terms, "total": sum(terms.values())}


def _pin_notes(config: TrainingConfig, bitsandbytes_available: bool) -> list[str]:
    notes = []
    if config.optimizer_type == "AdamW8bit" and not bitsandbytes_available:
        notes.append(
            "optimizer_type AdamW8bit is pinned but needs CUDA and bitsandbytes: "
            "the trainer falls back to AdamW, and the estimate counts AdamW's state"
        )
    if config.cache_latents is False:
        notes.append("cache_latents is pinned off: the VAE stays on the device and encodes every step")
    return notes


def _verdict(
    knobs: Knobs, job: _Job, budget: int, device_bytes: int, fits: bool, config: TrainingConfig
) -> str:
    total = estimate_breakdown(knobs, job)["total"]
    where = f"the {_gib(budget)} budget ({BUDGET_FRACTION:.0%} of {_gib(device_bytes)})"
    if fits:
        return f"fits: estimated peak {_gib(total)} within {where}"
    costly = _costly_pins(knobs, job, config)
    blame = f"; pinned values that cost memory: {', '.join(costly)}" if costly else ""
    return (
        f"does not fit: estimated peak {_gib(total)} over {where} with every unpinned saving taken"
        f"{blame}; training is attempted anyway"
    )


def _costly_pins(knobs: Knobs, job: _Job, config: TrainingConfig) -> list[str]:
    """Each pinned value with what releasing it alone would save."""
    alternatives = {
        "cache_latents": dataclasses.replace(knobs, cache_latents=True),
        "gradient_checkpointing": dataclasses.replace(knobs, gradient_checkpointing=True),
        "optimizer_type": dataclasses.replace(knobs, optimizer="AdamW8bit"),
        "network_train_unet_only": dataclasses.replace(knobs, train_unet_only=True),
        "train_batch_size": dataclasses.replace(knobs, batch_size=1),
        "fp8_base": dataclasses.replace(knobs, fp8_base=True),
    }
    total = estimate_breakdown(knobs, job)["total"]
    costly = []
    for key in pinned_keys(config):
        saving = total - estimate_breakdown(alternatives[key], job)["total"]
        if saving >= MIB:
            costly.append(f"{key}={_toml(getattr(config, key))} (+{_gib(saving)})")
    return costly


def _plan(
    knobs: Knobs, job: _Job, device_bytes: int | None, fits: bool, reasons: list[str], pinned: list[str]
) -> MemoryPlan:
    breakdown = estimate_breakdown(knobs, job)
    return MemoryPlan(
        gradient_checkpointing=knobs.gradient_checkpointing,
        optimizer=knobs.optimizer,
        cache_latents=knobs.cache_latents,
        train_unet_only=knobs.train_unet_only,
        batch_size=knobs.batch_size,
        fp8_base=knobs.fp8_base,
        device_memory_bytes=device_bytes,
        estimated_peak_bytes=breakdown["total"],
        fits=fits,
        reasons=reasons,
        pinned=pinned,
        estimate_breakdown=breakdown,
    )


def _toml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"
