"""The FLUX.2 [klein] family end to end on tiny klein pipelines (distilled and base): recognition, Qwen3
encoding and patchified, batch-norm-normalised latents as the pipeline makes them, the transformer called
as the pipeline calls it, training through the entrypoint lowers the flow-matching loss, and the LoRA
files (diffusers' and kohya's) load and render alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch
from comfy_flux2_klein import bfl_from_diffusers
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusion_kit import CONFIG_FILE, TRAIN_STEPS, make_sagemaker_dirs
from family_kit import assert_previews_render
from lora_clients import comfyui_flux_to_diffusers
from loraflow_diffusion.families import (
    FlowMatchingObjective,
    family_for_checkpoint_keys,
    family_named,
    family_of,
)
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny_families import build_tiny_flux2_klein
from loraflow_shared.contracts import TrainingReport
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import LoraflowError
from loraflow_training.__main__ import main
from loraflow_training.data import load_training_data
from loraflow_training.resolve import _ignored_for_family
from loraflow_training.settings import read_config
from safetensors import safe_open
from safetensors.torch import save_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

CPU = torch.device("cpu")
WORDS = ["ohwx", "sks", "dog"]
FLUX2_KLEIN = family_named("flux2_klein")
STEPS = 60  # diffusers' default targets on the one-block tiny transformer learn slowly at first


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small gain nothing from a second thread; on a shared machine they lose."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_klein(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux2_klein(tmp_path_factory.mktemp("klein") / "model", words=WORDS, variant="base")


@pytest.fixture(scope="module")
def klein(tiny_klein: Path, tmp_path_factory: pytest.TempPathFactory) -> Flux2KleinPipeline:
    cache = tmp_path_factory.mktemp("cache")
    return cast(
        Flux2KleinPipeline, load_pipeline(str(tiny_klein), device=CPU, dtype=torch.float32, cache_dir=cache)
    )


def _render(pipe: Flux2KleinPipeline) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    result = pipe(
        prompt="ohwx", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    )
    return np.asarray(result.images[0])


def _fixed_noise_loss(pipe: Flux2KleinPipeline, dataset: Path) -> float:
    """The flow-matching loss on the training images and captions, with the same noise and times for
    every pipeline it is asked of: lower means the LoRA learnt them."""
    family = family_of(pipe)
    data = load_training_data(dataset, read_config(dataset, CONFIG_FILE).config)
    generator = torch.Generator().manual_seed(7)
    captions = sorted({sample.caption for sample in data.samples})
    with torch.no_grad():
        encoded = family.encode_prompts(pipe, captions, (64, 64))  # one bucket: the conditioning is size-free
        losses = []
        for index, sample in enumerate(data.samples):
            latents = family.encode_latents(pipe, data.pixels(index)[None], generator)
            cond = encoded.select(torch.tensor([captions.index(sample.caption)]))
            for t in (0.25, 0.5, 0.75):
                noise = torch.randn(latents.shape, generator=generator)
                noisy = (1 - t) * latents + t * noise
                prediction = family.predict(pipe.transformer, noisy, torch.tensor([t]), cond)
                losses.append(float(((prediction - (noise - latents)) ** 2).mean()))
    return sum(losses) / len(losses)


# -- recognition and encoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["distilled", "base"])
def test_given_klein_folder_when_loaded_then_klein_family_and_conditioning_is_the_pipelines_own(
    variant: str, tmp_path: Path
) -> None:
    model = build_tiny_flux2_klein(tmp_path / variant, words=WORDS, variant=variant)  # type: ignore[arg-type]
    pipe = cast(
        Flux2KleinPipeline, load_pipeline(str(model), device=CPU, dtype=torch.float32, cache_dir=tmp_path)
    )
    family = family_of(pipe)

    with torch.no_grad():
        conditioning = family.encode_prompts(pipe, ["ohwx", "a photo of sks dog"], (64, 64))
        embeds, _ = pipe.encode_prompt(["ohwx", "a photo of sks dog"], device=CPU)

    assert isinstance(pipe, Flux2KleinPipeline) and family is FLUX2_KLEIN
    assert pipe.config["is_distilled"] == (variant == "distilled")
    # 512 tokens (padding included: the transformer sees them all), 3 Qwen3 layers x its width of 16.
    assert conditioning.encoder_hidden_states.shape == (2, 512, 48) == embeds.shape
    assert torch.allclose(conditioning.encoder_hidden_states, embeds)
    assert conditioning.added_cond_kwargs == {}  # no pooled embedding, no mask reaches the transformer
    assert family.trainable_text_encoder_names == () and family.lora_components() == ("transformer",)


def test_given_images_when_encoded_then_the_pipelines_patchified_normalised_latents_unpatchified(
    klein: Flux2KleinPipeline,
) -> None:
    pixels = torch.randint(
        0, 256, (2, 3, 64, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )

    latents = FLUX2_KLEIN.encode_latents(klein, pixels, torch.Generator().manual_seed(1))

    images = pixels.float() / 127.5 - 1.0
    with torch.no_grad():  # the pipeline's own reference-image encoding (posterior mean, batch norm)
        expected = klein._encode_vae_image(images, generator=torch.Generator().manual_seed(1))
    assert latents.shape == (2, FLUX2_KLEIN.latent_channels(klein), 64 // 8, 96 // 8) == (2, 32, 8, 12)
    assert torch.allclose(Flux2KleinPipeline._patchify_latents(latents), expected, atol=1e-6)
    # The statistics are not the identity (a fresh BatchNorm's): the normalisation is really applied.
    assert not torch.allclose(klein.vae.bn.running_mean, torch.zeros_like(klein.vae.bn.running_mean))


def test_given_noisy_latents_when_predicted_then_the_pipelines_transformer_call_in_the_latents_shape(
    klein: Flux2KleinPipeline,
) -> None:
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 32, 4, 6, generator=generator)
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        cond = FLUX2_KLEIN.encode_prompts(klein, ["ohwx", "sks dog"], (48, 32))
        predicted = FLUX2_KLEIN.predict(klein.transformer, noisy, sigmas, cond)
        # As `Flux2KleinPipeline.__call__` denoises: packed patchified latents, ids, timestep / 1000.
        patches = Flux2KleinPipeline._patchify_latents(noisy)
        ids = Flux2KleinPipeline._prepare_latent_ids(patches)
        embeds, text_ids = klein.encode_prompt(["ohwx", "sks dog"], device=CPU)
        output = klein.transformer(
            hidden_states=Flux2KleinPipeline._pack_latents(patches),
            timestep=(sigmas * 1000) / 1000,
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        expected = Flux2KleinPipeline._unpatchify_latents(
            Flux2KleinPipeline._unpack_latents_with_ids(output, ids, 2, 3)
        )
        other_time = FLUX2_KLEIN.predict(klein.transformer, noisy, sigmas.flip(0), cond)

    assert predicted.shape == noisy.shape
    assert torch.allclose(predicted, expected, atol=1e-6)
    assert not torch.allclose(predicted, other_time)  # the time reaches the transformer


def test_given_odd_latent_sides_when_predicted_then_refused_with_the_side_rule(
    klein: Flux2KleinPipeline,
) -> None:
    cond = FLUX2_KLEIN.encode_prompts(klein, ["ohwx"], (72, 64))

    with pytest.raises(ValueError, match="multiples of 16"):
        FLUX2_KLEIN.predict(klein.transformer, torch.zeros(1, 32, 8, 9), torch.tensor([0.5]), cond)


def test_given_klein_single_file_when_loaded_then_refused_as_klein_not_taken_for_flux1(
    klein: Flux2KleinPipeline, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "flux-2-klein.safetensors"  # the transformer alone, in BFL's layout
    save_file(
        {
            key: value.contiguous()
            for key, value in bfl_from_diffusers(klein.transformer.state_dict()).items()
        },
        checkpoint,
    )
    with safe_open(str(checkpoint), framework="pt") as handle:
        keys = set(handle.keys())

    with pytest.raises(LoraflowError, match=r"FLUX\.2 \[klein\] model cannot load from a single file"):
        load_pipeline(str(checkpoint), device=CPU, dtype=torch.float32, cache_dir=tmp_path / "cache")

    assert "double_blocks.0.img_attn.qkv.weight" in keys  # what FLUX.1 files hold too
    assert family_for_checkpoint_keys(keys) is FLUX2_KLEIN
    # A FLUX.1 file (BFL layout, as ComfyUI's port names it) is still FLUX.1's: per-block modulations.
    flux1_config = {
        "num_layers": 1,
        "num_single_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
    }
    flux1_keys = {target.key for target in comfyui_flux_to_diffusers(flux1_config).values()}
    assert family_for_checkpoint_keys(flux1_keys) is family_named("flux1")


# -- configuration --------------------------------------------------------------------------------------


def test_given_flux1_and_sd_only_keys_when_klein_trained_then_reported_as_not_applying() -> None:
    config = TrainingConfig(clip_skip=2, min_snr_gamma=5.0, guidance_scale=2.0, t5xxl_max_token_length=64)

    notes = _ignored_for_family(config, FLUX2_KLEIN)

    assert [note.split(":")[0] for note in notes] == [
        "clip_skip",
        "guidance_scale",
        "min_snr_gamma",
        "t5xxl_max_token_length",
    ]
    assert "a FLUX.2 [klein] model" in notes[0]
    # musubi-tuner's recommended flux2_shift: FLUX's resolution shift over the packed image tokens.
    assert FLUX2_KLEIN.objective == FlowMatchingObjective(timestep_sampling="flux_shift")


def test_given_a_9b_width_transformer_when_exported_then_named_as_musubi_tuner_names_the_9b() -> None:
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(num_layers=1, num_single_layers=1, num_attention_heads=32)
    pipe = cast(DiffusionPipeline, SimpleNamespace(transformer=transformer))

    facts = FLUX2_KLEIN.export_facts(pipe)

    assert (facts.base_model_version, facts.architecture) == ("flux_2_klein_9b", "Flux.2-klein-9b")


# -- training end to end -----------------------------------------------------------------------------------


def test_given_klein_base_when_trained_then_loss_drops_lora_files_load_alike_and_previews_render(
    aws: None, tiny_klein: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = make_sagemaker_dirs(tmp_path / "job", str(tiny_klein))
    config = dirs.dataset / CONFIG_FILE
    config.write_text(
        config.read_text().replace(f"max_train_steps = {TRAIN_STEPS}", f"max_train_steps = {STEPS}")
    )
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)

    exit_code = main(["train"])

    assert exit_code == 0, (dirs.output / "failure").read_text() if (dirs.output / "failure").exists() else ""
    report = TrainingReport.model_validate_json((dirs.model / "training_report.json").read_text())
    extra = report.model_extra or {}
    assert extra["model_family"] == "flux2_klein"
    assert extra["trained_components"] == ["transformer"]  # the Qwen3 encoder never trains
    assert extra["config"]["network_train_unet_only"] is True  # so captions were encoded once, not per step
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    pipe.set_progress_bar_config(disable=True)
    base_render, base_loss = _render(pipe), _fixed_noise_loss(pipe, dirs.dataset)
    pipe.load_lora_weights(dirs.model)
    lora_render = _render(pipe)
    assert np.abs(lora_render - base_render).max() > 1e-3
    # It learnt the training images: measured LoRA/base 0.957 after 60 steps (0.984 after 40, 0.927 after 80).
    assert _fixed_noise_loss(pipe, dirs.dataset) < base_loss * 0.98
    kohya_file = dirs.model / f"{report.output_name}.safetensors"
    _assert_kohya_file_renders_as_the_diffusers_file(tiny_klein, kohya_file, lora_render)
    _assert_kohya_metadata_names_klein(kohya_file)
    assert_previews_render(tiny_klein, dirs.model / "pytorch_lora_weights.safetensors", tmp_path)


def _assert_kohya_file_renders_as_the_diffusers_file(
    model: Path, kohya_file: Path, expected: np.ndarray
) -> None:
    """diffusers' FLUX.2 kohya reader takes the BFL names back apart: the same LoRA, the same picture."""
    pipe = Flux2KleinPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(kohya_file))
    assert np.abs(_render(pipe) - expected).max() < 1e-4


def _assert_kohya_metadata_names_klein(kohya_file: Path) -> None:
    with safe_open(str(kohya_file), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    modules = {key.split(".")[0] for key in keys}
    assert modules and all(
        module.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for module in modules
    )
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= modules
    assert metadata["ss_base_model_version"] == "flux_2_klein_4b"
    assert metadata["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux2"
