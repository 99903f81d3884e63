"""The Qwen-Image family end to end on a tiny Qwen-Image pipeline: recognition, the prompt encoding and the
transformer call exactly as `QwenImagePipeline` makes them, the VAE's per-channel normalisation, the
flow-matching objective lowering the loss, and both LoRA files loading back and rendering previews."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from diffusion_kit import CONFIG_FILE, make_sagemaker_dirs
from family_kit import assert_previews_render
from loraflow_diffusion.families import (
    Conditioning,
    TextEmbeddings,
    family_named,
    family_of,
)
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.tiny_families import build_tiny_qwen_image
from loraflow_shared.contracts import TrainingReport
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.errors import LoraflowError
from loraflow_training.__main__ import main
from loraflow_training.data import load_training_data
from loraflow_training.settings import read_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

CPU = torch.device("cpu")
PROMPTS = ["ohwx", "a photo of sks dog"]  # 1 and 15 tokens: the shorter one is padded under the mask
MASK = "encoder_hidden_states_mask"


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen") / "model", words=["ohwx", "sks", "dog"])


@pytest.fixture(scope="module")
def pipe(tiny_qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> QwenImagePipeline:
    cache = tmp_path_factory.mktemp("cache")
    loaded = load_pipeline(str(tiny_qwen), device=CPU, dtype=torch.float32, cache_dir=cache)
    assert isinstance(loaded, QwenImagePipeline)
    return loaded


def test_given_qwen_image_folder_when_loaded_then_family_encodes_as_the_pipelines_encode_prompt(
    pipe: QwenImagePipeline,
) -> None:
    family = family_of(pipe)

    with torch.no_grad():
        cond = family.encode_prompts(pipe, PROMPTS, (64, 64))

    assert family is family_named("qwen_image")
    embeds, mask = pipe.encode_prompt(PROMPTS, device=CPU)  # the system prompt's 34 tokens dropped
    length = embeds.shape[1]
    assert mask is not None and mask.sum(dim=1).tolist() == [6, length]  # the 5 template tokens come after
    assert torch.allclose(cond.encoder_hidden_states[:, :length], embeds)
    assert torch.equal(cond.added_cond_kwargs[MASK][:, :length], mask)
    # The rest is padding to the pipeline's 512-token limit: zeros, masked.
    assert cond.encoder_hidden_states.shape[1] == 512
    assert (
        not cond.encoder_hidden_states[:, length:].any()
        and not cond.added_cond_kwargs[MASK][:, length:].any()
    )


@pytest.mark.parametrize("prompts", [PROMPTS, ["ohwx"]], ids=["masked", "unmasked"])
def test_given_the_pipelines_own_transformer_calls_when_predicted_then_the_same_output_in_latent_shape(
    pipe: QwenImagePipeline, prompts: list[str]
) -> None:
    family = family_of(pipe)
    calls = _transformer_calls(pipe, prompts, height=48, width=64)

    with torch.no_grad():
        cond = family.encode_prompts(pipe, prompts, (64, 48))
        predictions = [
            family.predict(pipe.transformer, _unpacked(pipe, call["hidden_states"]), call["timestep"], cond)
            for call, _ in calls
        ]

    assert len(calls) == 2 and calls[0][0]["timestep"][0] != calls[1][0]["timestep"][0]
    assert (calls[0][0][MASK] is None) == (len(prompts) == 1)  # the pipeline's mask is None when all true
    for prediction, (_, output) in zip(predictions, calls, strict=True):
        assert prediction.shape == (len(prompts), 16, 6, 8)  # [N, C, H/8, W/8], frame axis and packing gone
        assert torch.allclose(prediction, _unpacked(pipe, output), atol=1e-6)


def test_given_captions_encoded_in_separate_batches_when_stacked_then_they_predict_as_one_batch(
    pipe: QwenImagePipeline,
) -> None:
    family = family_of(pipe)
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.8])

    with torch.no_grad():
        # What the trainer's caption cache does: chunks encoded apart, then concatenated and selected.
        parts = [family.encode_tokens([pipe.text_encoder], family.tokenize(pipe, [p])) for p in PROMPTS]
        cached = TextEmbeddings.concatenated(parts).select(torch.tensor([0, 1]))
        apart = family.predict(pipe.transformer, noisy, t, family.conditioning(cached, (64, 64)))
        together = family.predict(pipe.transformer, noisy, t, family.encode_prompts(pipe, PROMPTS, (64, 64)))

    assert torch.allclose(apart, together, atol=1e-6)


def test_given_images_when_encoded_then_the_pipelines_decoding_step_gives_the_vaes_own_latents_back(
    pipe: QwenImagePipeline,
) -> None:
    family = family_of(pipe)
    pixels = torch.randint(
        0, 256, (2, 3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )

    latents = family.encode_latents(pipe, pixels, torch.Generator().manual_seed(5))

    frames = (pixels.float() / 127.5 - 1.0)[:, :, None]  # one frame: the VAE is a video VAE
    with torch.no_grad():
        raw = pipe.vae.encode(frames).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    assert latents.shape == (2, 16, 6, 8) and latents.dtype == torch.float32
    # QwenImagePipeline.__call__'s last step before `vae.decode`, on the family's latents.
    config = pipe.vae.config
    latents_mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
    assert torch.allclose(latents[:, :, None] / latents_std + latents_mean, raw, atol=1e-5)
    assert not torch.allclose(latents[:, :, None], raw, atol=0.1)  # the normalisation is not the identity


def test_given_qwen_image_base_when_trained_then_loss_falls_both_files_load_and_previews_render(
    aws: None, tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = make_sagemaker_dirs(tmp_path / "job", str(tiny_qwen))
    config = dirs.dataset / CONFIG_FILE  # a faster rate: the tiny transformer's one block learns slowly
    config.write_text(config.read_text().replace("learning_rate = 1e-2", "learning_rate = 3e-2"))
    for name, value in dirs.env().items():
        monkeypatch.setenv(name, value)

    exit_code = main(["train"])

    assert exit_code == 0, (dirs.output / "failure").read_text() if (dirs.output / "failure").exists() else ""
    report = TrainingReport.model_validate_json((dirs.model / "training_report.json").read_text())
    extra = report.model_extra or {}
    assert extra["model_family"] == "qwen_image"
    assert extra["trained_components"] == ["transformer"]  # Qwen2.5-VL is never trained
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen)
    pipe.set_progress_bar_config(disable=True)
    losses = _FixedNoiseLoss(pipe, dirs.dataset)
    base_render, base_loss = _render(pipe), losses(pipe)
    pipe.load_lora_weights(dirs.model)
    lora_render = _render(pipe)
    assert (lora_render - base_render).abs().max() > 1e-3
    # It learnt the training images: measured LoRA/base 0.925 after 12 steps (at the config's 1e-2: 0.993).
    assert losses(pipe) < base_loss * 0.97
    kohya_file = dirs.model / f"{report.output_name}.safetensors"
    _assert_kohya_file_names_qwen_image(kohya_file)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(load_file(kohya_file))  # musubi-tuner's names, as diffusers reads them
    assert torch.allclose(_render(pipe), lora_render, atol=1e-5)
    assert_previews_render(tiny_qwen, dirs.model / "pytorch_lora_weights.safetensors", tmp_path)


def test_given_the_transformers_single_file_when_loaded_then_refused_naming_the_family(
    pipe: QwenImagePipeline, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "qwen_image_bf16.safetensors"  # the original layout: diffusers' names, no prefix
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(checkpoint))

    with pytest.raises(LoraflowError, match="a Qwen-Image model cannot load from a single file"):
        load_pipeline(str(checkpoint), device=CPU, dtype=torch.float32, cache_dir=tmp_path / "cache")


def test_given_sd_and_flux_only_keys_when_qwen_image_trained_then_reported_as_not_applying() -> None:
    from loraflow_training.resolve import _ignored_for_family

    config = TrainingConfig(clip_skip=2, min_snr_gamma=5.0, guidance_scale=2.0, t5xxl_max_token_length=64)

    notes = _ignored_for_family(config, family_named("qwen_image"))

    assert [note.split(":")[0] for note in notes] == [
        "clip_skip",
        "guidance_scale",  # no guidance embedding: the pipeline ignores the scale too
        "min_snr_gamma",
        "t5xxl_max_token_length",
    ]
    assert all("a Qwen-Image model" in note for note in notes)


# -- helpers ----------------------------------------------------------------------------------------------


def _transformer_calls(
    pipe: QwenImagePipeline, prompts: Sequence[str], height: int, width: int
) -> list[tuple[dict[str, Any], torch.Tensor]]:
    """Each transformer call of a 2-step render, as the pipeline makes it: keyword arguments and output."""
    calls: list[tuple[dict[str, Any], torch.Tensor]] = []

    def record(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        calls.append((dict(kwargs), output[0].detach().clone()))

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        generator = torch.Generator("cpu").manual_seed(0)
        pipe(
            list(prompts),
            num_inference_steps=2,
            height=height,
            width=width,
            generator=generator,
            output_type="latent",
        )
    finally:
        handle.remove()
    return calls


def _unpacked(pipe: QwenImagePipeline, packed: torch.Tensor) -> torch.Tensor:
    """Packed latents `[N, h/2 * w/2, 64]` of a 64x48 image as `[N, 16, h, w]`, the pipeline's unpacking."""
    return QwenImagePipeline._unpack_latents(packed, 48, 64, pipe.vae_scale_factor)[:, :, 0]


def _render(pipe: QwenImagePipeline) -> torch.Tensor:
    """A 2-step render of "ohwx" (seed 0), as the packed latents the VAE would decode."""
    generator = torch.Generator("cpu").manual_seed(0)
    result = pipe(
        "ohwx", num_inference_steps=2, height=64, width=64, generator=generator, output_type="latent"
    )
    return torch.as_tensor(result.images)


class _FixedNoiseLoss:
    """The flow-matching loss on the training images and captions, with the same noise and times for every
    transformer it is asked of: lower means the LoRA learnt them. (The VAE and the text encoder carry no
    LoRA: their outputs are computed once.)"""

    def __init__(self, pipe: QwenImagePipeline, dataset: Path) -> None:
        family = family_of(pipe)
        data = load_training_data(dataset, read_config(dataset, CONFIG_FILE).config)
        generator = torch.Generator().manual_seed(7)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor]] = []
        with torch.no_grad():
            for index, sample in enumerate(data.samples):
                latents = family.encode_latents(pipe, data.pixels(index)[None], generator)
                cond = family.encode_prompts(pipe, [sample.caption], sample.bucket)
                for t in (0.25, 0.5, 0.75):
                    noise = torch.randn(latents.shape, generator=generator)
                    self.inputs.append(
                        ((1 - t) * latents + t * noise, torch.tensor([t]), cond, noise - latents)
                    )

    def __call__(self, pipe: QwenImagePipeline) -> float:
        family = family_of(pipe)
        with torch.no_grad():
            losses = [
                float(((family.predict(pipe.transformer, noisy, t, cond) - target) ** 2).mean())
                for noisy, t, cond, target in self.inputs
            ]
        return sum(losses) / len(losses)


def _assert_kohya_file_names_qwen_image(kohya_file: Path) -> None:
    """musubi-tuner's names and metadata; that ComfyUI maps each module: test_qwen_image_lora_names."""
    with safe_open(str(kohya_file), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    modules = {key.split(".")[0] for key in keys}
    assert modules and all(module.startswith("lora_unet_transformer_blocks_") for module in modules)
    assert {module.rsplit("_attn_", 1)[1] for module in modules} == {"to_q", "to_k", "to_v", "to_out_0"}
    assert metadata["ss_base_model_version"] == "qwen_image"
    assert metadata["modelspec.architecture"] == "Qwen-Image/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/QwenLM/Qwen-Image"
