"""The FLUX.1 family end to end on tiny FLUX.1 [dev] and [schnell] pipelines: recognition, packed
latents and guidance reach the transformer, the flow-matching objective lowers the loss, and the
diffusers-format LoRA loads back with `FluxPipeline.load_lora_weights`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusion_kit import CONFIG_FILE, make_sagemaker_dirs
from family_kit import assert_previews_render
from loraflow_diffusion.families import family_named, family_of
from loraflow_diffusion.families.base import Conditioning
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny_families import build_tiny_flux1
from loraflow_shared.contracts import TrainingReport
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_training.__main__ import main
from loraflow_training.data import load_training_data
from loraflow_training.family_sizes import fit_sizes_to_family
from loraflow_training.flow import FlowMatching, FlowSampling
from loraflow_training.settings import read_config
from safetensors import safe_open

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux1(tmp_path_factory.mktemp("tiny-flux") / "model", words=["ohwx", "sks", "dog"])


def _render(pipe: FluxPipeline) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    result = pipe("ohwx", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")
    return np.asarray(result.images[0])


def _fixed_noise_loss(pipe: FluxPipeline, dataset: Path) -> float:
    """The flow-matching loss on the training images and captions, with the same noise and times for
    every pipeline it is asked of: lower means the LoRA learnt them."""
    family = family_of(pipe)
    config, _ = fit_sizes_to_family(read_config(dataset, CONFIG_FILE).config, family.pixel_multiple)
    data = load_training_data(dataset, config)  # the images at the sizes the trainer used
    generator = torch.Generator().manual_seed(7)
    losses = []
    with torch.no_grad():
        for index, sample in enumerate(data.samples):
            latents = family.encode_latents(pipe, data.pixels(index)[None], generator)
            cond = family.encode_prompts(pipe, [sample.caption], sample.bucket)
            for t in (0.25, 0.5, 0.75):
                noise = torch.randn(latents.shape, generator=generator)
                noisy = (1 - t) * latents + t * noise
                prediction = family.predict(pipe.transformer, noisy, torch.tensor([t]), cond)
                losses.append(float(((prediction - (noise - latents)) ** 2).mean()))
    return sum(losses) / len(losses)


def test_given_flux_folder_when_loaded_then_flux_family_with_t5_sequence_and_clip_pooled(
    tiny_flux: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(str(tiny_flux), device=CPU, dtype=torch.float32, cache_dir=tmp_path)
    family = family_of(pipe)

    conditioning = family.encode_prompts(pipe, ["ohwx", "sks dog"], (64, 64))

    assert isinstance(pipe, FluxPipeline) and family is family_named("flux1")
    assert conditioning.encoder_hidden_states.shape[:2] == (2, pipe.tokenizer_2.model_max_length)
    assert conditioning.added_cond_kwargs["pooled_projections"].shape == (2, 32)
    # What the pipeline itself feeds the transformer, for the same prompts.
    embeds, pooled, _ = pipe.encode_prompt(["ohwx", "sks dog"], prompt_2=None, device=CPU)
    assert torch.allclose(conditioning.encoder_hidden_states, embeds)
    assert torch.allclose(conditioning.added_cond_kwargs["pooled_projections"], pooled)


def test_given_noisy_latents_when_predicted_then_shape_kept_and_guidance_changes_dev_output(
    tiny_flux: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(str(tiny_flux), device=CPU, dtype=torch.float32, cache_dir=tmp_path)
    family = family_of(pipe)
    cond = family.encode_prompts(pipe, ["ohwx", "ohwx"], (64, 48))
    noisy = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.8])

    with torch.no_grad():
        at_one = family.predict(pipe.transformer, noisy, t, cond, guidance=1.0)
        at_four = family.predict(pipe.transformer, noisy, t, cond, guidance=4.0)

    assert at_one.shape == noisy.shape  # packed for the transformer, unpacked again for the loss
    assert not torch.allclose(at_one, at_four)  # [dev] embeds the guidance it trains with


@pytest.mark.parametrize("masked", [True, False])
def test_given_apply_t5_attn_mask_when_predicted_then_t5_padding_changes_nothing_only_with_the_mask(
    tiny_flux: Path, tmp_path: Path, masked: bool
) -> None:
    pipe = load_pipeline(str(tiny_flux), device=CPU, dtype=torch.float32, cache_dir=tmp_path)
    family = family_of(pipe)
    family.adopt_config(pipe, TrainingConfig(apply_t5_attn_mask=masked))
    cond = family.encode_prompts(pipe, ["ohwx", "sks dog"], (64, 64))
    padding = (
        pipe.tokenizer_2(["ohwx", "sks dog"], padding="max_length", return_tensors="pt").attention_mask == 0
    )
    noise = torch.randn(cond.encoder_hidden_states.shape, generator=torch.Generator().manual_seed(2))
    repadded = Conditioning(
        torch.where(padding[..., None], noise, cond.encoder_hidden_states), cond.added_cond_kwargs
    )
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.8])

    with torch.no_grad():
        plain = family.predict(pipe.transformer, noisy, t, cond)
        other_padding = family.predict(pipe.transformer, noisy, t, repadded)

    assert padding.any()
    assert torch.allclose(plain, other_padding, atol=1e-6) is masked  # padding is ignored only under the mask
    if masked:  # T5 itself encoded each caption under its mask, as sd-scripts does
        t5_mask = cond.added_cond_kwargs["t5_attention_mask"]
        assert torch.equal(t5_mask.bool(), ~padding)


def test_given_schnell_when_predicted_then_no_guidance_embedding_is_asked_for(tmp_path: Path) -> None:
    model = build_tiny_flux1(tmp_path / "schnell", variant="schnell")
    pipe = load_pipeline(str(model), device=CPU, dtype=torch.float32, cache_dir=tmp_path)
    family = family_of(pipe)
    cond = family.encode_prompts(pipe, ["ohwx"], (64, 64))
    noisy = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        plain = family.predict(pipe.transformer, noisy, torch.tensor([0.5]), cond)
        guided = family.predict(pipe.transformer, noisy, torch.tensor([0.5]), cond, guidance=4.0)

    assert not pipe.transformer.config.guidance_embeds
    assert torch.equal(plain, guided)  # nothing embeds it: the scale cannot matter
    assert family.export_facts(pipe).architecture == "flux-1-schnell"


@pytest.mark.parametrize("method", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_given_flow_sampling_when_drawn_then_times_in_unit_interval_and_shift_moves_them_up(
    method: str,
) -> None:
    generator = torch.Generator().manual_seed(0)
    plain = FlowSampling("sigmoid", 3.0, 1.0).draw(4096, 4096, torch.Generator().manual_seed(0))

    t = FlowSampling(method, 3.0, 1.0).draw(4096, 4096, generator)  # type: ignore[arg-type]

    assert t.shape == (4096,) and bool(((t > 0) & (t < 1)).all())
    if method in ("shift", "flux_shift"):
        assert t.mean() > plain.mean() + 0.05  # more noise: what both shifts are for


def test_given_flow_matching_when_target_built_then_velocity_and_interpolation() -> None:
    objective = FlowMatching(FlowSampling("uniform", 1.0, 1.0), timestep_scale=1.0, noise_offset=None)
    latents = torch.randn(3, 16, 4, 4)
    draw = objective.draw(latents.shape, torch.Generator().manual_seed(2))

    noisy = objective.noisy_latents(latents, draw)

    t = draw.timesteps.view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - t) * latents + t * draw.noise)
    assert torch.allclose(objective.target(latents, draw), draw.noise - latents)
    # A perfect velocity prediction walks the noisy latents back to the clean ones.
    assert torch.allclose(noisy - t * objective.target(latents, draw), latents, atol=1e-6)


def test_given_flux_base_when_trained_then_lora_loads_changes_output_and_previews_render(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_flux1(tmp_path / "model", variant="dev")
    dirs = make_sagemaker_dirs(tmp_path / "job", str(model))
    config_path = dirs.dataset / CONFIG_FILE
    # An SD-sized resolution (a multiple of 8, not of 16): FLUX's packed latents need 16, so 72 -> 64.
    config_path.write_text(config_path.read_text().replace("resolution = 64", "resolution = 72"))
    with config_path.open("a", encoding="utf-8") as config:
        config.write("t5xxl_max_token_length = 32\n")  # short prompts: T5's 512 only slow the test down
        config.write("apply_t5_attn_mask = true\n")  # the mask through caching, batching and the loop
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)

    exit_code = main(["train"])

    assert exit_code == 0, (dirs.output / "failure").read_text() if (dirs.output / "failure").exists() else ""
    report = TrainingReport.model_validate_json((dirs.model / "training_report.json").read_text())
    extra = report.model_extra or {}
    assert extra["model_family"] == "flux1"
    assert extra["config"]["t5xxl_max_token_length"] == 32
    assert extra["config"]["resolution"] == [64, 64]
    assert any("72x72 became 64x64" in w.message for w in report.warnings), report.warnings
    # CLIP-L trains unless network_train_unet_only (kohya's default); T5 never does (as both scripts).
    assert extra["trained_components"] == ["transformer", "text_encoder"]
    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    base_render, base_loss = _render(pipe), _fixed_noise_loss(pipe, dirs.dataset)
    pipe.load_lora_weights(dirs.model)
    assert np.abs(_render(pipe) - base_render).max() > 1e-3
    # It learnt the training images: measured LoRA/base 0.930 after 12 steps ([schnell] 0.957).
    assert _fixed_noise_loss(pipe, dirs.dataset) < base_loss * 0.98
    assert_previews_render(model, dirs.model / "pytorch_lora_weights.safetensors", tmp_path)
    _assert_kohya_file_has_bfl_names(dirs.model / f"{report.output_name}.safetensors")


def _assert_kohya_file_has_bfl_names(kohya_file: Path) -> None:
    """sd-scripts' FLUX names (what ComfyUI, Forge and sd-scripts read); exactness: test_flux_lora_names."""
    with safe_open(str(kohya_file), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    modules = {key.split(".")[0] for key in keys}
    prefixes = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_")
    assert modules and all(module.startswith(prefixes) for module in modules), sorted(modules)[:5]
    assert any(module.endswith("_img_attn_qkv") for module in modules)
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"


def test_given_sd_only_keys_when_flux_trained_then_reported_as_not_applying() -> None:
    from loraflow_training.resolve import _ignored_for_family

    config = TrainingConfig(clip_skip=2, min_snr_gamma=5.0, guidance_scale=2.0, apply_t5_attn_mask=True)

    notes = _ignored_for_family(config, family_named("flux1"))
    sd_notes = _ignored_for_family(config, family_named("sd15"))
    klein_notes = _ignored_for_family(config, family_named("flux2_klein"))

    assert [note.split(":")[0] for note in notes] == ["clip_skip", "min_snr_gamma"]
    assert "a FLUX.1 model" in notes[0]
    assert [note.split(":")[0] for note in sd_notes] == ["apply_t5_attn_mask", "guidance_scale"]
    assert "apply_t5_attn_mask" in [note.split(":")[0] for note in klein_notes]  # no T5 there
