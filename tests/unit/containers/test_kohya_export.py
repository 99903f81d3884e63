"""The kohya-format LoRA (`<output_name>.safetensors`): loaded with `load_lora_weights` it renders the same
images as the diffusers file and as the in-memory LoRA; kohya keys, per-module alphas, `ss_*` metadata."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusion_kit import render_ohwx
from loraflow_diffusion.families import SupportedPipeline, family_of
from loraflow_diffusion.families.base import ExportFacts
from loraflow_diffusion.tiny import build_tiny_sdxl
from loraflow_shared.dataset.config import NetworkArgs, TrainingConfig
from loraflow_training.kohya import (
    _CONFIG_KEYS,
    _RENAMED,
    BaseModelFacts,
    ComponentLora,
    LoraMetadataInputs,
    kohya_metadata,
    sd_model_name,
    to_kohya_state_dict,
)
from loraflow_training.network import denoiser_targets, lora_config
from loraflow_training.outputs import LORA_WEIGHTS_NAME, SavedLora, save_lora
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

RANK, ALPHA = 4, 2.0  # alpha != rank: a file or loader that loses alpha renders at twice the strength
OUTPUT_NAME = "my-lora"
TARGETS = {
    "unet": ["to_k", "to_q", "to_v", "to_out.0"],
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "text_encoder_2": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
CONFIG = TrainingConfig.model_validate({"resolution": 64, "network_dim": RANK, "network_alpha": ALPHA})
CONV_RANK, CONV_ALPHA = 2, 3.0  # LoCon: the convolutions' own rank and alpha (scale 1.5, not the 0.5 above)
CONV_CONFIG = CONFIG.model_copy(
    update={"network_args": NetworkArgs(conv_dim=CONV_RANK, conv_alpha=CONV_ALPHA)}
)
SAME_IMAGE = 1e-4  # max abs pixel difference (0-1 scale) for "identical" renders
STARTED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = datetime(2026, 3, 1, 12, 5, 30, tzinfo=UTC)
CAPTIONS = {
    "3_ohwx": ["ohwx, a red circle", "ohwx", "OHWX, a red circle, a red circle"],
    "2_sks dog": ["sks dog"] * 4,
    "reg/1_dog": ["dog", "dog, grass"],
}


@dataclass(frozen=True)
class Export:
    saved: SavedLora
    base: np.ndarray  # the base model's render
    in_memory: np.ndarray  # the render with the LoRA still on the training pipeline
    from_diffusers: np.ndarray  # a fresh pipeline + load_lora_weights(pytorch_lora_weights.safetensors)
    from_kohya: np.ndarray  # a fresh pipeline + load_lora_weights(<output_name>.safetensors)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


def _load(pipeline_class: type[SupportedPipeline], model: Path) -> SupportedPipeline:
    pipe = pipeline_class.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapter(pipe: SupportedPipeline, name: str, convs: bool) -> LoraConfig:
    if not (convs and name == "unet"):
        return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[name])  # type: ignore[arg-type]
    family = family_of(pipe)  # LoCon: the adapter training adds with conv_dim/conv_alpha
    return lora_config(CONV_CONFIG, denoiser_targets(family, CONV_CONFIG), family.conv_target_modules)


def _add_random_lora(pipe: SupportedPipeline, components: tuple[str, ...], convs: bool = False) -> None:
    """Adapters as training adds them, then random up *and* down weights (a fresh LoRA's up is zero)."""
    generator = torch.Generator().manual_seed(0)
    for name in components:
        module = getattr(pipe, name)
        module.add_adapter(_adapter(pipe, name, convs))
        with torch.no_grad():
            for param_name, param in module.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _metadata_inputs(base_model: str) -> LoraMetadataInputs:
    return LoraMetadataInputs(
        config=CONFIG,
        base_model=base_model,
        steps=12,
        epochs=2,
        started_at=STARTED,
        finished_at=FINISHED,
        captions_by_subset=CAPTIONS,
        reg_subsets={"reg/1_dog"},
    )


def _export(
    pipeline_class: type[SupportedPipeline],
    model: Path,
    components: tuple[str, ...],
    model_dir: Path,
    convs: bool = False,
) -> Export:
    pipe = _load(pipeline_class, model)
    base = render_ohwx(pipe)
    _add_random_lora(pipe, components, convs)
    in_memory = render_ohwx(pipe)
    saved = save_lora(model_dir, pipe, OUTPUT_NAME, _metadata_inputs(str(model)))
    renders = []
    for weights in (saved.diffusers_file, saved.kohya_file):
        fresh = _load(pipeline_class, model)
        fresh.load_lora_weights(model_dir, weight_name=weights.name)
        renders.append(render_ohwx(fresh))
    return Export(saved, base, in_memory, *renders)


@pytest.fixture(scope="module")
def sd_export(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Export:
    return _export(
        StableDiffusionPipeline, tiny_model, ("unet", "text_encoder"), tmp_path_factory.mktemp("sd-lora")
    )


@pytest.fixture(scope="module")
def sdxl_export(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Export:
    components = ("unet", "text_encoder", "text_encoder_2")
    return _export(StableDiffusionXLPipeline, tiny_sdxl, components, tmp_path_factory.mktemp("sdxl-lora"))


def _assert_same_images(export: Export) -> None:
    assert np.abs(export.from_kohya - export.from_diffusers).max() < SAME_IMAGE
    assert np.abs(export.from_kohya - export.in_memory).max() < SAME_IMAGE
    assert np.abs(export.from_kohya - export.base).max() > 0.05  # the LoRA shows: dropping it would fail


def test_given_sd_unet_and_text_encoder_lora_when_kohya_file_loaded_then_same_images_as_diffusers_file(
    sd_export: Export,
) -> None:
    assert sd_export.saved.components == ("unet", "text_encoder")
    _assert_same_images(sd_export)


def test_given_sd_unet_only_lora_when_kohya_file_loaded_then_same_images_as_diffusers_file(
    tiny_model: Path, tmp_path: Path
) -> None:
    export = _export(StableDiffusionPipeline, tiny_model, ("unet",), tmp_path)

    assert export.saved.components == ("unet",)
    assert all(key.startswith("lora_unet_") for key in load_file(export.saved.kohya_file))
    _assert_same_images(export)


def test_given_sdxl_lora_on_unet_and_both_text_encoders_when_kohya_file_loaded_then_same_images(
    sdxl_export: Export,
) -> None:
    assert sdxl_export.saved.components == ("unet", "text_encoder", "text_encoder_2")
    _assert_same_images(sdxl_export)


@pytest.mark.parametrize("pipeline_class", [StableDiffusionPipeline, StableDiffusionXLPipeline])
def test_given_lora_on_the_convolutions_too_when_both_files_loaded_then_same_images_with_kohya_conv_shapes(
    pipeline_class: type[SupportedPipeline], tiny_model: Path, tiny_sdxl: Path, tmp_path: Path
) -> None:
    model = tiny_model if pipeline_class is StableDiffusionPipeline else tiny_sdxl

    export = _export(pipeline_class, model, ("unet",), tmp_path, convs=True)

    _assert_same_images(export)
    tensors = load_file(export.saved.kohya_file)
    convs = {
        key.split(".")[0] for key, tensor in tensors.items() if tensor.ndim == 4 and tensor.shape[-1] == 3
    }
    assert convs  # kohya's LoCon layout: a 3x3 down [rank, in, 3, 3], a 1x1 up [out, rank, 1, 1]
    assert all(tensors[f"{module}.lora_down.weight"].shape[0] == CONV_RANK for module in convs)
    assert all(tensors[f"{module}.lora_up.weight"].shape[-2:] == (1, 1) for module in convs)
    assert {tensors[f"{module}.alpha"].item() for module in convs} == {CONV_ALPHA}
    assert json.loads(export.saved.metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3.0"}


def _modules_by_prefix(path: Path) -> dict[str, set[str]]:
    """kohya module name -> the tensor suffixes it has (lora_down.weight, lora_up.weight, alpha)."""
    modules: dict[str, set[str]] = {}
    for key in load_file(path):
        module, suffix = key.split(".", 1)
        modules.setdefault(module, set()).add(suffix)
    return modules


def test_given_sd_export_when_read_then_kohya_keys_with_alpha_per_module(sd_export: Export) -> None:
    tensors = load_file(sd_export.saved.kohya_file)
    modules = _modules_by_prefix(sd_export.saved.kohya_file)

    assert all(suffixes == {"lora_down.weight", "lora_up.weight", "alpha"} for suffixes in modules.values())
    assert {module.split("_")[1] for module in modules} == {"unet", "te"}  # kohya's SD 1.x prefixes
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    # CLIP modules under `text_model`, as A1111 and ComfyUI look them up (transformers 5 flattened it).
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert {tensors[f"{module}.alpha"].item() for module in modules} == {ALPHA}
    assert len(modules) == len(load_file(sd_export.saved.diffusers_file)) // 2  # one per LoRA layer (A, B)


def test_given_sdxl_export_when_read_then_te1_and_te2_prefixes(sdxl_export: Export) -> None:
    modules = _modules_by_prefix(sdxl_export.saved.kohya_file)

    assert {module.split("_")[1] for module in modules} == {"unet", "te1", "te2"}
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in modules


def test_given_export_when_diffusers_file_read_then_peft_keys_per_component(sd_export: Export) -> None:
    keys = list(load_file(sd_export.saved.diffusers_file))

    assert sd_export.saved.diffusers_file.name == LORA_WEIGHTS_NAME
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
    assert all(".lora_A." in key or ".lora_B." in key for key in keys)


def test_given_export_when_metadata_read_then_ss_keys_and_payload_hash(
    sd_export: Export, tiny_model: Path
) -> None:
    path = sd_export.saved.kohya_file
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]

    assert metadata["sshs_model_hash"] == hashlib.sha256(path.read_bytes()[8 + header_size :]).hexdigest()
    assert {key: metadata[key] for key in sd_export.saved.metadata} == sd_export.saved.metadata
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert "ss_network_args" not in metadata  # sd-scripts writes it only for a network with arguments
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_sd_model_name"] == tiny_model.name  # the folder's name, never the full path
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_given_sdxl_export_when_metadata_read_then_sdxl_base_version(sdxl_export: Export) -> None:
    metadata = sdxl_export.saved.metadata

    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def _facts() -> BaseModelFacts:
    sd1 = ExportFacts("sd_v1", "stable-diffusion-v1", "diffusers", sd_v2=False, v_parameterization=False)
    return BaseModelFacts(model=sd1, network_dim=4, network_alpha=2.0)


def test_given_run_facts_when_metadata_built_then_kohya_values() -> None:
    metadata = kohya_metadata(_metadata_inputs("s3://models/sd15/base.safetensors"), _facts(), OUTPUT_NAME)

    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_sd_model_name"] == "base.safetensors"
    assert metadata["ss_resolution"] == "(64, 64)"
    assert (metadata["ss_max_train_steps"], metadata["ss_num_epochs"]) == ("12", "2")
    assert metadata["ss_training_started_at"] == str(STARTED.timestamp())
    assert metadata["ss_training_finished_at"] == str(FINISHED.timestamp())
    assert metadata["ss_output_name"] == OUTPUT_NAME
    assert metadata["ss_learning_rate"] == "0.0001" and metadata["ss_lr_scheduler"] == "constant"
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == ("17", "2")  # x repeats
    assert metadata["modelspec.trigger_phrase"] == "ohwx, sks"  # training subsets only, not reg
    assert metadata["modelspec.resolution"] == "64x64"
    assert all(isinstance(value, str) for value in metadata.values())


def test_given_config_when_metadata_built_then_every_listed_setting_recorded() -> None:
    metadata = kohya_metadata(_metadata_inputs("org/model"), _facts(), OUTPUT_NAME)

    # `model_dump(include=...)` skips names the config lacks: a renamed config key must fail here.
    expected = {_RENAMED.get(name, f"ss_{name}") for name in (*_CONFIG_KEYS, "train_batch_size")}
    assert expected <= metadata.keys()
    assert metadata["ss_optimizer"] == "None" and metadata["ss_max_grad_norm"] == "1.0"


def test_given_captions_when_metadata_built_then_tag_frequency_per_training_subset() -> None:
    metadata = kohya_metadata(_metadata_inputs("org/model"), _facts(), OUTPUT_NAME)

    assert json.loads(metadata["ss_tag_frequency"]) == {
        "3_ohwx": {"ohwx": 3, "a red circle": 3},  # lower-cased, counted per occurrence as sd-scripts
        "2_sks dog": {"sks dog": 4},
    }
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "3_ohwx": {"n_repeats": 3, "img_count": 3},
        "2_sks dog": {"n_repeats": 2, "img_count": 4},
    }
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"reg/1_dog": {"n_repeats": 1, "img_count": 2}}


@pytest.mark.parametrize(
    ("reference", "name"),
    [
        ("s3://bucket/models/sd15.safetensors", "sd15.safetensors"),
        ("/opt/ml/input/data/model/", "model"),
        ("C:\\models\\sd15.ckpt", "sd15.ckpt"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
    ],
)
def test_given_base_model_reference_when_named_then_hub_id_kept_and_paths_shortened(
    reference: str, name: str
) -> None:
    assert sd_model_name(reference) == name


def test_given_pipeline_without_lora_when_saved_then_value_error(tiny_model: Path, tmp_path: Path) -> None:
    pipe = _load(StableDiffusionPipeline, tiny_model)

    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(tmp_path, pipe, OUTPUT_NAME, _metadata_inputs(str(tiny_model)))
    assert not list(tmp_path.iterdir())


def test_given_dora_magnitudes_when_converted_then_value_error_names_them() -> None:
    lora = ComponentLora(
        name="unet",
        state_dict={
            "mid.to_q.lora_A.weight": torch.ones(4, 8),
            "mid.to_q.lora_B.weight": torch.ones(8, 4),
            "mid.to_q.lora_magnitude_vector": torch.ones(8),
        },
        alphas={"mid.to_q": 2.0},
    )

    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        to_kohya_state_dict([lora])


def test_given_alpha_per_module_when_converted_then_each_alpha_kept() -> None:
    lora = ComponentLora(
        name="unet",
        state_dict={
            f"{module}.lora_{part}.weight": torch.ones(4, 4)
            for module in ("a.to_q", "b.to_k")
            for part in "AB"
        },
        alphas={"a.to_q": 1.0, "b.to_k": 8.0},
    )

    kohya = to_kohya_state_dict([lora])

    assert kohya["lora_unet_a_to_q.alpha"].item() == 1.0
    assert kohya["lora_unet_b_to_k.alpha"].item() == 8.0
