"""Sizes a model family takes: packed-latent DiTs train on multiples of 16, SD on multiples of 8."""

from __future__ import annotations

from loraflow_diffusion.families import FAMILIES, family_named
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_training.family_sizes import fit_sizes_to_family


def test_given_sd_sizes_when_fitted_to_a_packed_family_then_rounded_to_16_and_each_change_reported() -> None:
    config = TrainingConfig(resolution=(520, 776), bucket_reso_steps=8, enable_bucket=True)

    fitted, notes = fit_sizes_to_family(config, family_named("flux1").pixel_multiple)

    assert (fitted.resolution, fitted.bucket_reso_steps) == ((512, 768), 16)
    assert [note.split(":")[0] for note in notes] == ["resolution", "bucket_reso_steps"]
    assert "520x776 became 512x768" in notes[0] and "multiples of 16" in notes[0]
    assert fitted.enable_bucket  # nothing else changes


def test_given_steps_not_dividing_when_fitted_then_the_least_common_multiple() -> None:
    fitted, _ = fit_sizes_to_family(TrainingConfig(bucket_reso_steps=24), 16)

    assert fitted.bucket_reso_steps == 48  # still a multiple of what the user asked for


def test_given_fitting_sizes_or_sd_families_when_fitted_then_config_unchanged_and_nothing_reported() -> None:
    config = TrainingConfig(resolution=(520, 512), bucket_reso_steps=8)

    assert fit_sizes_to_family(TrainingConfig(resolution=(1024, 768)), 16) == (
        TrainingConfig(resolution=(1024, 768)),
        [],
    )
    assert fit_sizes_to_family(config, family_named("sdxl").pixel_multiple) == (config, [])


def test_given_every_family_when_its_multiple_is_read_then_the_vae_factor_or_twice_it() -> None:
    assert {family.name: family.pixel_multiple for family in FAMILIES} == {
        "sd15": 8,
        "sdxl": 8,
        "flux1": 16,
        "flux2_klein": 16,
        "qwen_image": 16,
        "z_image": 16,
    }
