"""The memory plan (which knobs a run takes to fit the GPU) and out-of-memory failures."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from loraflow_diffusion.families import family_named
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode
from loraflow_training.memory_plan import (
    BUDGET_FRACTION,
    GIB,
    PREFERRED_GPU_BATCH_SIZE,
    MemoryPlan,
    plan_memory,
)
from loraflow_training.oom import is_out_of_memory, out_of_memory_error

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

SD15_512 = ("sd15", (512, 512))
SDXL_1024 = ("sdxl", (1024, 1024))


def plan(
    family_and_resolution: tuple[str, tuple[int, int]],
    gib: float | None,
    bitsandbytes: bool = False,
    **config: Any,
) -> MemoryPlan:
    family, resolution = family_and_resolution
    memory = None if gib is None else int(gib * GIB)
    footprint = family_named(family).footprint
    return plan_memory(TrainingConfig(**config), footprint, resolution, memory, bitsandbytes)


def knobs(result: MemoryPlan) -> dict[str, Any]:
    return result.model_dump(
        include={"gradient_checkpointing", "optimizer", "cache_latents", "train_unet_only", "batch_size"}
    )


def test_given_no_gpu_when_planned_then_cpu_defaults_and_no_saving_taken() -> None:
    result = plan(SDXL_1024, None, mixed_precision="bf16")

    assert knobs(result) == {
        "gradient_checkpointing": False,
        "optimizer": "AdamW",
        "cache_latents": True,
        "train_unet_only": False,
        "batch_size": 1,
    }
    assert result.device_memory_bytes is None and result.fits
    assert result.pinned == [] and "no GPU" in result.reasons[0]
    assert result.estimate_breakdown["device_overhead"] == 0


def test_given_no_gpu_and_pinned_values_when_planned_then_the_pins_are_kept() -> None:
    result = plan(
        SD15_512, None, train_batch_size=3, gradient_checkpointing=True, network_train_unet_only=True
    )

    assert (result.batch_size, result.gradient_checkpointing, result.train_unet_only) == (3, True, True)
    assert result.pinned == ["gradient_checkpointing", "network_train_unet_only", "train_batch_size"]


def test_given_24gib_gpu_and_sdxl_at_1024_when_planned_then_checkpointing_is_turned_on_first() -> None:
    result = plan(SDXL_1024, 24, mixed_precision="fp16")

    assert result.gradient_checkpointing
    # Checkpointing alone makes it fit: the later knobs stay at their fastest.
    assert (result.optimizer, result.train_unet_only, result.batch_size) == (
        "AdamW",
        False,
        PREFERRED_GPU_BATCH_SIZE,
    )
    assert result.fits and result.estimated_peak_bytes <= 24 * GIB * BUDGET_FRACTION
    assert result.reasons[0].startswith("gradient_checkpointing on: the estimate before was")


def test_given_8gib_gpu_and_sd15_at_512_in_fp16_when_planned_then_it_fits_without_savings() -> None:
    result = plan(SD15_512, 8, mixed_precision="fp16")

    assert not result.gradient_checkpointing and result.batch_size == PREFERRED_GPU_BATCH_SIZE
    assert result.fits and result.reasons == [result.reasons[-1]] and result.reasons[-1].startswith("fits")


def test_given_8gib_gpu_and_sd15_at_512_in_fp32_when_planned_then_checkpointing_makes_it_fit() -> None:
    fp16 = plan(SD15_512, 8, mixed_precision="fp16")
    fp32 = plan(SD15_512, 8, mixed_precision="no")

    assert fp32.gradient_checkpointing and fp32.fits
    # fp32 doubles the weights: the estimate without checkpointing is well over fp16's.
    assert fp32.estimate_breakdown["frozen_weights"] == 2 * fp16.estimate_breakdown["frozen_weights"]


def test_given_8gib_gpu_and_sdxl_at_1024_with_bitsandbytes_when_planned_then_every_knob_in_order() -> None:
    result = plan(SDXL_1024, 8, bitsandbytes=True, mixed_precision="fp16")

    assert knobs(result) == {
        "gradient_checkpointing": True,
        "optimizer": "AdamW8bit",
        "cache_latents": True,
        "train_unet_only": True,
        "batch_size": 1,
    }
    taken = [reason.split(":")[0] for reason in result.reasons[:-1]]
    assert taken == [
        "gradient_checkpointing on",
        "optimizer AdamW8bit",
        "UNet-only training (text encoders not trained)",
        f"batch size {PREFERRED_GPU_BATCH_SIZE} -> 1",
    ]
    assert result.fits


def test_given_no_bitsandbytes_when_memory_is_short_then_adamw8bit_is_never_chosen() -> None:
    result = plan(SDXL_1024, 8, bitsandbytes=False, mixed_precision="fp16")

    assert result.optimizer == "AdamW"
    assert result.train_unet_only and result.batch_size == 1


def test_given_80gib_gpu_and_pinned_batch_when_planned_then_everything_off_and_batch_as_configured() -> None:
    result = plan(SDXL_1024, 80, mixed_precision="bf16", train_batch_size=8)

    assert knobs(result) == {
        "gradient_checkpointing": False,
        "optimizer": "AdamW",
        "cache_latents": True,
        "train_unet_only": False,
        "batch_size": 8,
    }
    assert result.fits and result.pinned == ["train_batch_size"]


def test_given_pins_that_cannot_fit_when_planned_then_reasons_say_so_and_name_the_costly_pins() -> None:
    result = plan(
        SDXL_1024,
        8,
        bitsandbytes=True,
        mixed_precision="fp16",
        gradient_checkpointing=False,
        train_batch_size=2,
    )

    assert not result.fits
    assert (result.gradient_checkpointing, result.batch_size) == (False, 2)  # pins respected
    verdict = result.reasons[-1]
    assert verdict.startswith("does not fit") and "training is attempted anyway" in verdict
    assert "gradient_checkpointing=false (+" in verdict and "train_batch_size=2 (+" in verdict


def test_given_adamw8bit_pinned_without_bitsandbytes_when_planned_then_kept_and_estimated_as_adamw() -> None:
    pinned = plan(SD15_512, 24, bitsandbytes=False, mixed_precision="fp16", optimizer_type="adamw8bit")
    adamw = plan(SD15_512, 24, bitsandbytes=False, mixed_precision="fp16", optimizer_type="AdamW")

    assert pinned.optimizer == "AdamW8bit"  # the trainer falls back and reports SETTING_ADJUSTED
    assert pinned.estimated_peak_bytes == adamw.estimated_peak_bytes
    assert any("falls back to AdamW" in reason for reason in pinned.reasons)


def test_given_adamw8bit_available_when_estimated_then_less_optimizer_state_than_adamw() -> None:
    eight_bit = plan(SD15_512, 24, bitsandbytes=True, mixed_precision="fp16", optimizer_type="AdamW8bit")
    adamw = plan(SD15_512, 24, bitsandbytes=True, mixed_precision="fp16", optimizer_type="AdamW")

    assert (
        eight_bit.estimate_breakdown["lora_training_state"] < adamw.estimate_breakdown["lora_training_state"]
    )


def test_given_double_side_when_estimated_then_unet_activations_grow_four_times() -> None:
    unet_only: dict[str, Any] = {
        "mixed_precision": "fp16",
        "train_batch_size": 1,
        "network_train_unet_only": True,
    }
    small = plan(("sd15", (512, 512)), 80, **unet_only)
    large = plan(("sd15", (1024, 1024)), 80, **unet_only)

    ratio = large.estimate_breakdown["activations"] / small.estimate_breakdown["activations"]
    assert ratio == pytest.approx(4.0, rel=0.01)
    assert large.estimate_breakdown["frozen_weights"] == small.estimate_breakdown["frozen_weights"]


def test_given_varying_captions_when_training_unet_only_then_text_encoders_still_count() -> None:
    cached = plan(SD15_512, 24, mixed_precision="fp16", network_train_unet_only=True)
    varying = plan(SD15_512, 24, mixed_precision="fp16", network_train_unet_only=True, shuffle_caption=True)

    # Shuffled captions are encoded every step: the text encoder stays on the GPU.
    assert varying.estimate_breakdown["frozen_weights"] > cached.estimate_breakdown["frozen_weights"]


def test_given_latent_caching_pinned_off_when_planned_then_vae_counted_and_noted() -> None:
    cached = plan(SD15_512, 24, mixed_precision="fp16", train_batch_size=1)
    uncached = plan(SD15_512, 24, mixed_precision="fp16", train_batch_size=1, cache_latents=False)

    assert not uncached.cache_latents
    assert uncached.estimated_peak_bytes > cached.estimated_peak_bytes
    assert any("cache_latents is pinned off" in reason for reason in uncached.reasons)


def test_given_unknown_family_when_planned_then_value_error_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="sd15, sdxl"):
        plan(("flux", (512, 512)), 24)


# -- out of memory ---------------------------------------------------------------------------------


def test_given_torch_out_of_memory_error_when_checked_then_recognised() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))


def test_given_runtime_error_with_cuda_oom_text_when_checked_then_recognised() -> None:
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB)"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))


def test_given_oom_wrapped_in_another_error_when_checked_then_recognised_through_the_chain() -> None:
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("step failed") from inner
    except RuntimeError as outer:
        assert is_out_of_memory(outer)


def test_given_other_errors_when_checked_then_not_out_of_memory() -> None:
    assert not is_out_of_memory(RuntimeError("expected scalar type Half but found Float"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))  # the text alone, on a non-runtime error


def test_given_plan_when_oom_error_built_then_code_plan_fields_and_advice_in_message() -> None:
    tried = plan(SDXL_1024, 24, mixed_precision="fp16")

    error = out_of_memory_error(
        tried, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB\nmore")
    )

    assert error.code == ErrorCode.OUT_OF_MEMORY
    for field in ("batch_size=4", "gradient_checkpointing=on", "optimizer=AdamW", "cache_latents=on"):
        assert field in error.message
    assert "train_unet_only=off" in error.message and "24.0 GiB GPU" in error.message
    assert "a smaller train_batch_size" in error.message and "network_train_unet_only = true" in error.message
    assert "gradient_checkpointing = true" not in error.message  # already on
    assert error.message.endswith("(CUDA out of memory. Tried to allocate 4.00 GiB)")
    assert len(error.message) < 1000  # the failure file keeps 1 KiB


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image", "z_image"])
def test_given_family_whose_llm_text_encoder_never_trains_when_planned_then_denoiser_only_from_the_start(
    family: str,
) -> None:
    footprint = family_named(family).footprint
    result = plan((family, (1024, 1024)), 80, mixed_precision="bf16")

    assert result.train_unet_only
    assert not any("UNet-only" in reason for reason in result.reasons)  # not a saving: the family's way
    # Captions are encoded once, so the (large) text encoder leaves the GPU: only the denoiser's weights.
    assert result.estimate_breakdown["frozen_weights"] == footprint.denoiser_params * 2


FLUX1_1024 = ("flux1", (1024, 1024))


def test_given_24gib_gpu_and_flux1_at_1024_when_planned_then_fp8_base_is_the_last_saving_and_fits() -> None:
    result = plan(FLUX1_1024, 24, bitsandbytes=True, mixed_precision="bf16")

    taken = [reason.split(":")[0] for reason in result.reasons[:-1]]
    assert taken[-1] == "fp8 base (the frozen denoiser stored in float8)"
    assert result.fp8_base and result.fits
    assert result.estimated_peak_bytes <= 22 * GIB  # the 24 GB plan
    assert result.estimate_breakdown["frozen_weights"] == family_named("flux1").footprint.denoiser_params


def test_given_fp8_base_pinned_off_on_24gib_when_flux1_is_planned_then_does_not_fit_naming_the_pin() -> None:
    result = plan(FLUX1_1024, 24, bitsandbytes=True, mixed_precision="bf16", fp8_base=False)

    assert not result.fits and not result.fp8_base
    assert "fp8_base=false (+" in result.reasons[-1] and result.pinned == ["fp8_base"]


def test_given_48gib_gpu_and_flux1_when_planned_then_bf16_weights_without_fp8() -> None:
    result = plan(FLUX1_1024, 48, bitsandbytes=True, mixed_precision="bf16")

    assert result.fits and not result.fp8_base
