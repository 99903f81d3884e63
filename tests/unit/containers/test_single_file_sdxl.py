"""SDXL single-file checkpoints of the tiny SDXL pipeline, in the original (SGM) layout that A1111, kohya and
ComfyUI read: loaded back offline through `load_pipeline`, locally and from S3, they render exactly like the
diffusers folder, which proves the conversion of both text encoders, the UNet and the VAE both ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusion_kit import assert_same_weights, render_ohwx, upload_checkpoint_with_config
from loraflow_diffusion.families import SupportedPipeline, family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_diffusion.single_file import config_dir_for, save_single_file
from loraflow_diffusion.tiny import build_tiny_sdxl
from loraflow_shared.errors import ErrorCode, LoraflowError
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

CPU = torch.device("cpu")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CLIP_L = "conditioner.embedders.0.transformer.text_model."
BIG_G = "conditioner.embedders.1.model."
# The diffusers-folder pipeline and its render: what every loaded checkpoint must match.
Reference = tuple[StableDiffusionXLPipeline, np.ndarray]


def _load(ref: str, cache_dir: Path) -> SupportedPipeline:
    return load_pipeline(ref, device=CPU, dtype=torch.float32, cache_dir=cache_dir, expect_family="sdxl")


def _assert_same_pipeline(
    loaded: SupportedPipeline, reference: StableDiffusionXLPipeline, image: np.ndarray
) -> None:
    assert isinstance(loaded, StableDiffusionXLPipeline) and family_of(loaded).name == "sdxl"
    assert_same_weights(loaded, reference, COMPONENTS)
    np.testing.assert_allclose(render_ohwx(loaded), image, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl: Path) -> Path:
    folder = tmp_path_factory.mktemp("single-file-sdxl")
    save_single_file(tiny_sdxl, folder / "tiny-sdxl.safetensors")
    save_single_file(tiny_sdxl, folder / "tiny-sdxl.ckpt")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    pipe = _load(str(tiny_sdxl), tmp_path_factory.mktemp("cache"))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    image = render_ohwx(pipe)
    assert np.ptp(image) > 0.05, "a flat render would make the comparisons below meaningless"
    return pipe, image


def test_given_tiny_sdxl_when_saved_then_text_encoders_have_sgm_names(
    checkpoints: Path, reference: Reference
) -> None:
    weights = load_file(checkpoints / "tiny-sdxl.safetensors")
    big_g = reference[0].text_encoder_2
    attention = big_g.text_model.encoder.layers[0].self_attn

    assert weights[f"{CLIP_L}embeddings.position_embedding.weight"].shape == (77, 32)
    assert weights[f"{BIG_G}positional_embedding"].shape == (77, 48)
    # OpenCLIP packs q, k and v in one in_proj and stores the projection as `x @ P`.
    in_proj = weights[f"{BIG_G}transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(
        in_proj, torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    )
    assert torch.equal(weights[f"{BIG_G}text_projection"], big_g.text_projection.weight.T)
    assert f"{BIG_G}transformer.resblocks.1.mlp.c_proj.bias" in weights
    assert "model.diffusion_model.label_emb.0.0.weight" in weights  # the size/crop micro-conditioning
    assert not any("q_proj" in key or "text_model.encoder" in key for key in weights if key.startswith(BIG_G))
    assert (
        config_dir_for(checkpoints / "tiny-sdxl.safetensors") / "text_encoder_2" / "config.json"
    ).is_file()


@pytest.mark.parametrize("name", ["tiny-sdxl.safetensors", "tiny-sdxl.ckpt"])
def test_given_local_sdxl_checkpoint_with_config_when_loaded_then_renders_like_the_diffusers_folder(
    checkpoints: Path, reference: Reference, tmp_path: Path, name: str
) -> None:
    pipe = _load(str(checkpoints / name), tmp_path)

    _assert_same_pipeline(pipe, *reference)


def test_given_s3_sdxl_checkpoint_with_config_when_loaded_then_renders_like_the_diffusers_folder(
    aws: None, checkpoints: Path, reference: Reference, tmp_path: Path
) -> None:
    uri = upload_checkpoint_with_config(checkpoints / "tiny-sdxl.safetensors", "models", "base-models")

    pipe = _load(uri, tmp_path)

    _assert_same_pipeline(pipe, *reference)


def test_given_sdxl_checkpoint_and_config_saying_sd15_when_loaded_then_model_load_failed(
    checkpoints: Path, tmp_path: Path
) -> None:
    ref = str(checkpoints / "tiny-sdxl.safetensors")

    with pytest.raises(LoraflowError) as caught:
        load_pipeline(ref, device=CPU, dtype=torch.float32, cache_dir=tmp_path, expect_family="sd15")

    assert caught.value.code == ErrorCode.MODEL_LOAD_FAILED
    assert caught.value.message.startswith(f"config says sdxl = false but {ref!r} is an SDXL model")
