"""Single-file checkpoints of the tiny pipeline, written in the original (LDM) layout and loaded back offline
through `load_pipeline`: a render identical to the diffusers folder's proves the conversion both ways."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusion_kit import assert_same_weights, render_ohwx, upload_checkpoint_with_config
from loraflow_diffusion.families import SupportedPipeline
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.single_file import config_dir_for, save_single_file
from loraflow_shared.errors import ErrorCode, LoraflowError
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

CPU = torch.device("cpu")
ORIGINAL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
# The key by which diffusers (and `families`) recognise an SD 1.x checkpoint.
SD15_MARKER_KEY = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
# The diffusers-folder pipeline and its render: what every loaded checkpoint must match.
Reference = tuple[SupportedPipeline, np.ndarray]


def _load(ref: str, cache_dir: Path) -> SupportedPipeline:
    return load_pipeline(ref, device=CPU, dtype=torch.float32, cache_dir=cache_dir)


def _load_error(ref: str, cache_dir: Path) -> str:
    with pytest.raises(LoraflowError) as caught:
        _load(ref, cache_dir)
    assert caught.value.code == ErrorCode.MODEL_LOAD_FAILED
    return caught.value.message


def _assert_same_pipeline(loaded: SupportedPipeline, reference: SupportedPipeline, image: np.ndarray) -> None:
    assert isinstance(loaded, StableDiffusionPipeline)
    assert_same_weights(loaded, reference, ("unet", "vae", "text_encoder"))
    np.testing.assert_allclose(render_ohwx(loaded), image, atol=1e-6)


def _copy_with_weights(source: Path, target: Path, weights: dict[str, torch.Tensor]) -> Path:
    save_file(weights, str(target))
    shutil.copytree(config_dir_for(source), config_dir_for(target))
    return target


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    folder = tmp_path_factory.mktemp("single-file")
    save_single_file(tiny_model, folder / "tiny-sd.safetensors")
    save_single_file(tiny_model, folder / "tiny-sd.ckpt")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    pipe = _load(str(tiny_model), tmp_path_factory.mktemp("cache"))
    image = render_ohwx(pipe)
    assert np.ptp(image) > 0.05, "a flat render would make the comparisons below meaningless"
    return pipe, image


def test_given_tiny_pipeline_when_saved_then_every_key_has_an_original_layout_name(checkpoints: Path) -> None:
    weights = load_file(checkpoints / "tiny-sd.safetensors")

    assert all(key.startswith(ORIGINAL_PREFIXES) for key in weights)
    # The names A1111/kohya tools and diffusers' own single-file loader look for.
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in weights
    assert weights["model.diffusion_model.input_blocks.0.0.weight"].shape == (32, 4, 3, 3)
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in weights  # upsampler after attention
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in weights  # decoder levels numbered upwards
    assert weights["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # attention as 1x1 convolution
    assert (config_dir_for(checkpoints / "tiny-sd.safetensors") / "model_index.json").is_file()


@pytest.mark.parametrize("name", ["tiny-sd.safetensors", "tiny-sd.ckpt"])
def test_given_local_checkpoint_with_config_when_loaded_then_renders_like_the_diffusers_folder(
    checkpoints: Path, reference: Reference, tmp_path: Path, name: str
) -> None:
    pipe = _load(str(checkpoints / name), tmp_path)

    _assert_same_pipeline(pipe, *reference)


def test_given_s3_checkpoint_with_config_when_loaded_then_renders_like_the_diffusers_folder(
    aws: None, checkpoints: Path, reference: Reference, tmp_path: Path
) -> None:
    uri = upload_checkpoint_with_config(checkpoints / "tiny-sd.safetensors", "models", "base-models")

    pipe = _load(uri, tmp_path)

    _assert_same_pipeline(pipe, *reference)


def test_given_s3_checkpoint_without_config_when_loaded_then_model_load_failed_naming_the_config_folder(
    aws: None, checkpoints: Path, tmp_path: Path
) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    s3.upload_file(str(checkpoints / "tiny-sd.safetensors"), "models", "tiny-sd.safetensors")

    message = _load_error("s3://models/tiny-sd.safetensors", tmp_path)

    assert "unrecognised keys" in message and "'tiny-sd.config'" in message


def test_given_recognised_checkpoint_without_config_and_hub_offline_when_loaded_then_model_load_failed(
    checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a process started with HF_HUB_OFFLINE=1: huggingface_hub reads it at import, loraflow at call time.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    weights = load_file(checkpoints / "tiny-sd.safetensors")
    checkpoint = tmp_path / "looks-like-sd15.safetensors"
    save_file({**weights, SD15_MARKER_KEY: torch.zeros(1)}, str(checkpoint))

    message = _load_error(str(checkpoint), tmp_path / "cache")

    assert "Hugging Face Hub, which is offline" in message and "'looks-like-sd15.config'" in message


def test_given_config_folder_without_model_index_when_loaded_then_model_load_failed(
    checkpoints: Path, tmp_path: Path
) -> None:
    source = checkpoints / "tiny-sd.safetensors"
    checkpoint = _copy_with_weights(source, tmp_path / "m.safetensors", load_file(source))
    (config_dir_for(checkpoint) / "model_index.json").unlink()

    message = _load_error(str(checkpoint), tmp_path)

    assert message.endswith("the config folder 'm.config' has no model_index.json")


@pytest.mark.parametrize(
    ("missing_key", "expected"),
    [
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "1 weights of the text_encoder"),
        ("model.diffusion_model.out.2.weight", "the checkpoint lacks weights its config declares"),
    ],
)
def test_given_checkpoint_missing_a_weight_when_loaded_then_model_load_failed(
    checkpoints: Path, tmp_path: Path, missing_key: str, expected: str
) -> None:
    source = checkpoints / "tiny-sd.safetensors"
    weights = load_file(source)
    del weights[missing_key]
    checkpoint = _copy_with_weights(source, tmp_path / "partial.safetensors", weights)

    message = _load_error(str(checkpoint), tmp_path)

    assert expected in message


def test_given_unsupported_pipeline_folder_when_saved_as_single_file_then_refused(tmp_path: Path) -> None:
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')

    with pytest.raises(ValueError, match="not 'FluxPipeline'"):
        save_single_file(tmp_path / "flux", tmp_path / "flux.safetensors")

    assert not (tmp_path / "flux.safetensors").exists()


def test_given_unknown_suffix_when_saved_as_single_file_then_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="ends in one of"):
        save_single_file(tiny_model, tmp_path / "tiny-sd.bin")

    assert not any(tmp_path.iterdir())
