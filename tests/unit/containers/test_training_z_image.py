"""The Z-Image family end to end on tiny Z-Image Turbo and Base pipelines: recognition, captions encoded as
the pipeline encodes them, the transformer called as the pipeline calls it, the flow-matching objective lowers
the loss, the diffusers-format LoRA loads back with `ZImagePipeline.load_lora_weights`, previews render, and
the kohya file (ComfyUI's names) merged as ComfyUI merges it equals the diffusers file."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from comfy_z_image import comfyui_convert_diffusers_z_image, comfyui_merged, comfyui_z_image_to_diffusers
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusion_kit import CONFIG_FILE, TRAIN_STEPS, make_sagemaker_dirs
from family_kit import assert_previews_render
from loraflow_diffusion.families import (
    FlowMatchingObjective,
    family_for_checkpoint_keys,
    family_named,
    family_of,
)
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny_families import build_tiny_z_image
from loraflow_shared.contracts import TrainingReport
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_training.__main__ import main
from loraflow_training.data import load_training_data
from loraflow_training.flow import FlowSampling
from loraflow_training.resolve import _ignored_for_family
from loraflow_training.settings import read_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

CPU = torch.device("cpu")
WORDS = ["ohwx", "sks", "dog"]
STEPS = 30


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small gain nothing from a second thread; on a busy machine idle workers slow every call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_z_image(tmp_path_factory.mktemp("tiny-z-image") / "model", words=WORDS)


def _load(model: Path, cache: Path) -> Any:
    pipe = load_pipeline(str(model), device=CPU, dtype=torch.float32, cache_dir=cache)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe: ZImagePipeline) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    result = pipe("ohwx", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")
    return np.asarray(result.images[0])


def _fixed_noise_loss(pipe: ZImagePipeline, dataset: Path) -> float:
    """The flow-matching loss on the training images and captions, with the same noise and times for every
    pipeline it is asked of: lower means the LoRA learnt them."""
    family = family_of(pipe)
    data = load_training_data(dataset, read_config(dataset, CONFIG_FILE).config)
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


@pytest.mark.parametrize(("variant", "shift"), [("turbo", 3.0), ("base", 6.0)])
def test_given_z_image_folder_when_loaded_then_z_image_family_encoding_captions_as_the_pipeline(
    variant: str, shift: float, tiny_turbo: Path, tmp_path: Path
) -> None:
    base = variant == "base"
    model = build_tiny_z_image(tmp_path / "base", words=WORDS, variant="base") if base else tiny_turbo
    pipe = _load(model, tmp_path / "cache")
    family = family_of(pipe)
    prompts = ["ohwx", "a photo of sks dog, a red circle on a plain white ground"]

    conditioning = family.encode_prompts(pipe, prompts, (64, 48))

    assert isinstance(pipe, ZImagePipeline) and family is family_named("z_image")
    assert pipe.scheduler.config.shift == shift  # the two variants' one difference
    hidden, mask = conditioning.encoder_hidden_states, conditioning.added_cond_kwargs["attention_mask"]
    assert hidden.shape == (2, 512, pipe.text_encoder.config.hidden_size) and mask.shape == (2, 512)
    # What the pipeline itself feeds the transformer: one tensor per prompt, its caption tokens only.
    embeds, _ = pipe.encode_prompt(list(prompts), device=CPU, do_classifier_free_guidance=False)
    assert [int(row.sum()) for row in mask] == [len(embed) for embed in embeds]
    for states, keep, embed in zip(hidden, mask, embeds, strict=True):
        assert torch.allclose(states[keep], embed, atol=1e-6)
    # Columns past the longest caption were not run (zeros): that changed nothing above.
    assert 5 < len(embeds[1]) < 64 and not hidden[:, len(embeds[1]) :].any()


def test_given_pipeline_steps_when_predicted_then_the_velocity_of_the_transformer_calls_the_pipeline_made(
    tiny_turbo: Path, tmp_path: Path
) -> None:
    pipe = _load(tiny_turbo, tmp_path / "cache")
    family = family_of(pipe)
    prompts = ["ohwx", "sks dog"]
    calls: list[tuple[tuple[Any, ...], Any]] = []
    hook = pipe.transformer.register_forward_hook(lambda _, args, output: calls.append((args, output)))
    try:
        # A copy: the pipeline writes the chat-templated prompts into the list it is given.
        pipe(
            list(prompts),
            num_inference_steps=2,
            height=64,
            width=48,
            guidance_scale=0.0,
            output_type="latent",
        )
    finally:
        hook.remove()
    cond = family.encode_prompts(pipe, prompts, (48, 64))

    for ((latents, _, _), output), sigma in zip(calls, pipe.scheduler.sigmas, strict=False):
        noisy = torch.stack(latents).squeeze(2)
        with torch.no_grad():
            prediction = family.predict(pipe.transformer, noisy, sigma.expand(2), cond)
            flipped = family.predict(pipe.transformer, noisy, 1 - sigma.expand(2), cond)

        assert noisy.shape == prediction.shape == (2, 16, 8, 6)  # latents as the objective sees them
        # Z-Image predicts x - noise at time 1 - t; the family returns the velocity noise - x at t = sigma.
        assert torch.allclose(prediction, -torch.stack(output[0]).squeeze(2), atol=1e-5)
        assert not torch.allclose(prediction, flipped, atol=1e-3)
    assert len(calls) == 2 and 0 < float(pipe.scheduler.sigmas[1]) < 1


def test_given_z_image_base_when_trained_then_lora_learns_loads_renders_and_its_kohya_file_is_the_same_lora(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_z_image(tmp_path / "model", words=WORDS, variant="base")
    dirs = make_sagemaker_dirs(tmp_path / "job", str(model))
    config = dirs.dataset / CONFIG_FILE
    # 30 steps: the tiny transformer's attention-only LoRA learns slowly (LoRA/base 0.980 after 12).
    config.write_text(
        config.read_text().replace(f"max_train_steps = {TRAIN_STEPS}", f"max_train_steps = {STEPS}")
    )
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)

    exit_code = main(["train"])

    assert exit_code == 0, (dirs.output / "failure").read_text() if (dirs.output / "failure").exists() else ""
    report = TrainingReport.model_validate_json((dirs.model / "training_report.json").read_text())
    extra = report.model_extra or {}
    assert extra["model_family"] == "z_image" and report.steps == STEPS
    assert extra["trained_components"] == ["transformer"]  # the Qwen3 encoder never trains
    # The LoRA-effect check rendered the captions themselves, with and without the LoRA (the pipeline writes
    # chat-templated prompts into the list it is given: a reused list is templated twice).
    captions = {
        sample.caption
        for sample in load_training_data(dirs.dataset, read_config(dirs.dataset, CONFIG_FILE).config).samples
    }
    assert extra["effect"]["per_prompt"] and set(extra["effect"]["per_prompt"]) <= captions
    pipe = ZImagePipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    base_render, base_loss = _render(pipe), _fixed_noise_loss(pipe, dirs.dataset)
    pipe.load_lora_weights(dirs.model)
    assert np.abs(_render(pipe) - base_render).max() > 1e-3
    # It learnt the training images: measured LoRA/base 0.955 after 30 steps (0.926 after 60).
    assert _fixed_noise_loss(pipe, dirs.dataset) < base_loss * 0.98
    assert_previews_render(model, dirs.model / "pytorch_lora_weights.safetensors", tmp_path)
    kohya_file = dirs.model / f"{report.output_name}.safetensors"
    _assert_kohya_file_names_z_image_as_comfyui_and_musubi_do(kohya_file)
    _assert_comfyui_merge_is_the_diffusers_lora(
        pipe, ZImagePipeline.from_pretrained(model).transformer, kohya_file
    )


def _assert_kohya_file_names_z_image_as_comfyui_and_musubi_do(kohya_file: Path) -> None:
    """ComfyUI's module names (exactness: test_z_image_lora_names) and musubi-tuner's metadata."""
    with safe_open(str(kohya_file), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    modules = {key.split(".")[0] for key in keys}
    prefixes = ("lora_unet_layers_", "lora_unet_noise_refiner_", "lora_unet_context_refiner_")
    assert modules and all(module.startswith(prefixes) for module in modules), sorted(modules)[:5]
    assert {module.rsplit("_", 1)[-1] for module in modules} == {"qkv", "out"}
    assert metadata["ss_base_model_version"] == "z_image"
    assert metadata["modelspec.architecture"] == "Z-Image/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Tongyi-MAI/Z-Image"


def _assert_comfyui_merge_is_the_diffusers_lora(pipe: ZImagePipeline, base: Any, kohya_file: Path) -> None:
    """The kohya file merged into the base transformer as ComfyUI merges it predicts what the pipeline with
    the diffusers file loaded predicts: the two files hold the same LoRA."""
    merged, not_loaded = comfyui_merged(base, load_file(str(kohya_file)))
    family = family_of(pipe)
    cond = family.encode_prompts(pipe, ["ohwx", "sks dog"], (64, 64))
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.3, 0.8])

    with torch.no_grad():
        with_lora = family.predict(pipe.transformer, noisy, t, cond)
        without = family.predict(base, noisy, t, cond)
        comfy = family.predict(merged, noisy, t, cond)

    assert not_loaded == []
    assert (with_lora - without).abs().max() > 1e-3
    assert (comfy - with_lora).abs().max() < 1e-5


def test_given_a_z_image_transformer_single_file_when_loaded_then_recognised_and_refused(
    tiny_turbo: Path, tmp_path: Path
) -> None:
    """Z-Image ships its single files as the transformer alone (ComfyUI's layout): recognised by the family's
    marker key, refused as a base model (no text encoder or VAE in it), even with its config folder beside."""
    transformer = ZImagePipeline.from_pretrained(tiny_turbo).transformer
    state = comfyui_convert_diffusers_z_image(
        transformer.state_dict(), comfyui_z_image_to_diffusers(transformer.config)
    )
    checkpoint = tmp_path / "z_image_turbo.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(checkpoint))
    shutil.copytree(tiny_turbo, tmp_path / "z_image_turbo.config")

    with pytest.raises(LoraflowError) as caught:
        load_pipeline(str(checkpoint), device=CPU, dtype=torch.float32, cache_dir=tmp_path / "cache")

    assert family_for_checkpoint_keys(state.keys()) is family_named("z_image")
    assert caught.value.code == ErrorCode.MODEL_LOAD_FAILED and "z_image_turbo.safetensors" in str(
        caught.value
    )
    assert "a Z-Image model cannot load from a single file: give its diffusers folder" in str(caught.value)


def test_given_sd_and_flux_only_keys_when_z_image_trained_then_reported_as_not_applying() -> None:
    config = TrainingConfig(clip_skip=2, min_snr_gamma=5.0, guidance_scale=2.0, t5xxl_max_token_length=64)

    notes = _ignored_for_family(config, family_named("z_image"))

    assert [note.split(":")[0] for note in notes] == [
        "clip_skip",
        "guidance_scale",
        "min_snr_gamma",
        "t5xxl_max_token_length",
    ]
    assert "a Z-Image model" in notes[0]


def test_given_no_sampling_keys_when_z_image_trained_then_musubi_tuners_shifted_sigmoid_of_shift_2() -> None:
    objective = family_named("z_image").objective
    assert isinstance(objective, FlowMatchingObjective)

    sampling = FlowSampling.from_config(objective, TrainingConfig())
    chosen = FlowSampling.from_config(objective, TrainingConfig(discrete_flow_shift=3.0))

    assert (sampling.method, sampling.shift, sampling.sigmoid_scale) == ("shift", 2.0, 1.0)
    assert chosen.shift == 3.0  # the config's own choice wins
