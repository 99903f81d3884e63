"""sd-scripts' SDXL names for the kohya file's UNet modules (`kohya_sdxl_names`): each converted name is a
module sd-scripts' own SDXL UNet has, and ComfyUI, A1111 and diffusers still load every one of them.

Checked on SDXL base 1.0's real UNet (built on the meta device from its config) and on the tiny SDXL, whose
block layout differs: the conversion is read from the config. The expected SGM names come from diffusers'
single-file loader and from a port of ComfyUI's own mapping, never from the code under test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusion_kit import render_ohwx
from lora_clients import (
    a1111_layer_names,
    a1111_unet_module,
    comfyui_lora_key_map,
    comfyui_unet_to_diffusers,
)
from loraflow_diffusion.families import family_named
from loraflow_diffusion.families.sdxl_names import sai_module, sai_names, sai_prefixes
from loraflow_diffusion.tiny import build_tiny_sdxl
from loraflow_training.kohya import ComponentLora, to_kohya_state_dict, write_kohya_file
from loraflow_training.outputs import save_lora, trained_loras
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from test_kohya_export import OUTPUT_NAME, SAME_IMAGE, _add_random_lora, _load, _metadata_inputs

pytestmark = pytest.mark.slow  # builds SDXL's real-size UNet (on the meta device) and renders the tiny one

SDXL = family_named("sdxl")
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (sd-scripts keeps the same dict as
# `DIFFUSERS_SDXL_UNET_CONFIG` in library/sdxl_model_util.py).
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
# Modules loraflow's LoRA targets: 4 projections in each of a transformer block's 2 attentions. Transformer
# blocks (attention blocks x depth): SDXL base down 2x2 + 2x10, mid 1x10, up 3x10 + 3x2 = 70; the tiny
# SDXLs down 1x1, mid 1x1, up 2x1 = 4.
TARGETED_MODULES = {"sdxl-base-1.0": 70 * 2 * 4, "tiny-sdxl": 4 * 2 * 4, "tiny-plain-upsampler": 4 * 2 * 4}
# The tiny SDXL with its levels swapped: an upsampling level without attention (the upsampler's slot differs).
PLAIN_UPSAMPLER = {
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}


@dataclass(frozen=True)
class UnetTree:
    """A UNet's module tree and the kohya file kohya.py writes for a LoRA on loraflow's targets."""

    name: str  # a TARGETED_MODULES key
    config: Any  # the UNet's config as `pipe.unet.config` gives it
    keys: list[str]  # the UNet's own state-dict keys (no LoRA)
    kohya: dict[str, torch.Tensor]  # diffusers-path kohya names (`lora_unet_down_blocks_…`)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="module")
def base_tree() -> UnetTree:
    return _unet_tree("sdxl-base-1.0", SDXL_BASE_UNET_CONFIG)


@pytest.fixture(scope="module", params=sorted(TARGETED_MODULES))
def tree(request: pytest.FixtureRequest, tiny_sdxl: Path) -> UnetTree:
    if request.param == "sdxl-base-1.0":
        return cast(UnetTree, request.getfixturevalue("base_tree"))
    tiny = dict(UNet2DConditionModel.load_config(tiny_sdxl / "unet"))
    return _unet_tree(
        request.param, {**tiny, **PLAIN_UPSAMPLER} if request.param == "tiny-plain-upsampler" else tiny
    )


def _unet_tree(
    name: str, config: dict[str, Any], targets: tuple[str, ...] = SDXL.denoiser_target_modules
) -> UnetTree:
    """The UNet on the meta device (no memory, no weights), the LoRA added as training adds it."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        keys = list(unet.state_dict())
        unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=list(targets)))
    # The names are what matter: a different one-number tensor for each (kohya.py copies them to the CPU).
    lora_keys = get_peft_model_state_dict(unet)
    weights = {key: torch.tensor([float(index)]) for index, key in enumerate(lora_keys)}
    alphas = {key.removesuffix(".lora_A.weight"): 2.0 for key in lora_keys if key.endswith(".lora_A.weight")}
    lora = ComponentLora("unet", weights, alphas)
    return UnetTree(name, unet.config, keys, to_kohya_state_dict([lora]))


def _modules(state_dict: dict[str, Any]) -> set[str]:
    return {_module(key) for key in state_dict}


def _module(key: str) -> str:
    return key.split(".", 1)[0]


def _sgm_key(diffusers_key: str, config: Any) -> str:
    module, param = diffusers_key.rsplit(".", 1)
    return f"{sai_module(module, sai_prefixes(config))}.{param}"


_BLOCK = "transformer_blocks"


@pytest.mark.parametrize(
    ("diffusers", "sd_scripts"),
    [  # as sd-scripts' make_unet_conversion_map pairs them for SDXL base
        (f"down_blocks_1_attentions_0_{_BLOCK}_0_attn1_to_k", f"input_blocks_4_1_{_BLOCK}_0_attn1_to_k"),
        (f"down_blocks_2_attentions_1_{_BLOCK}_9_attn2_to_v", f"input_blocks_8_1_{_BLOCK}_9_attn2_to_v"),
        (f"mid_block_attentions_0_{_BLOCK}_3_attn1_to_out_0", f"middle_block_1_{_BLOCK}_3_attn1_to_out_0"),
        (f"up_blocks_0_attentions_2_{_BLOCK}_9_attn2_to_v", f"output_blocks_2_1_{_BLOCK}_9_attn2_to_v"),
        ("up_blocks_1_attentions_0_proj_in", "output_blocks_3_1_proj_in"),
        ("down_blocks_0_resnets_1_conv1", "input_blocks_2_0_in_layers_2"),
        ("mid_block_resnets_1_time_emb_proj", "middle_block_2_emb_layers_1"),
        ("up_blocks_2_resnets_0_conv_shortcut", "output_blocks_6_0_skip_connection"),
        ("down_blocks_1_downsamplers_0_conv", "input_blocks_6_0_op"),
        ("up_blocks_1_upsamplers_0_conv", "output_blocks_5_2_conv"),
        ("time_embedding_linear_2", "time_embed_2"),
        ("add_embedding_linear_1", "label_emb_0_0"),
        ("conv_in", "input_blocks_0_0"),
        ("conv_out", "out_2"),
    ],
)  # fmt: skip
def test_given_diffusers_path_name_when_converted_then_sd_scripts_sdxl_name(
    diffusers: str, sd_scripts: str
) -> None:
    parts = ("lora_down.weight", "lora_up.weight", "alpha")
    kohya = {f"lora_unet_{diffusers}.{part}": part for part in parts}

    converted = sai_names(kohya, SDXL_BASE_UNET_CONFIG)

    assert converted == {f"lora_unet_{sd_scripts}.{part}": part for part in parts}


def test_given_text_encoder_keys_when_converted_then_unchanged() -> None:
    kohya = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": 1,
        "lora_te2_text_model_encoder_layers_31_mlp_fc2.alpha": 2,
    }

    assert sai_names(kohya, SDXL_BASE_UNET_CONFIG) == kohya


@pytest.mark.parametrize(
    "module",
    [
        "down_blocks_0_attentions_0_proj_in",
        "down_blocks_2_downsamplers_0_conv",
        "up_blocks_2_upsamplers_0_conv",
        "down_blocks_1_attentions_10_proj_in",
        "unet_conv_in",
    ],
)
def test_given_module_the_unet_lacks_when_converted_then_value_error(module: str) -> None:
    # SDXL's first level has no attention; its last levels neither downsample nor upsample.
    with pytest.raises(ValueError, match="no name in sd-scripts' SDXL layout"):
        sai_names({f"lora_unet_{module}.alpha": 1}, SDXL_BASE_UNET_CONFIG)


@pytest.mark.parametrize(
    "change",
    [
        {"layers_per_block": [2, 2, 1]},
        {"mid_block_type": None},
        {"down_block_types": ["AttnDownBlock2D"] * 3},
    ],
)
def test_given_unet_layout_sgm_has_no_names_for_when_converted_then_value_error(
    change: dict[str, Any],
) -> None:
    with pytest.raises(ValueError):
        sai_prefixes({**SDXL_BASE_UNET_CONFIG, **change})


def test_given_unet_when_every_weight_renamed_then_diffusers_single_file_loader_reads_it_back(
    tree: UnetTree,
) -> None:
    """diffusers' SGM -> diffusers loader, given our SGM names, returns every weight under its own name."""
    checkpoint = {LDM_UNET_KEY + _sgm_key(key, tree.config): key for key in tree.keys}

    loaded = convert_ldm_unet_checkpoint(checkpoint, dict(tree.config))

    assert loaded == {key: key for key in tree.keys}


def test_given_unet_when_every_weight_renamed_then_same_names_as_comfyui(tree: UnetTree) -> None:
    """ComfyUI's own mapping (ported) agrees on every weight, the upsampler's slot included (which
    diffusers' loader reads from either slot)."""
    comfyui = comfyui_unet_to_diffusers(tree.config)

    assert {key: _sgm_key(key, tree.config) for key in tree.keys} == {key: comfyui[key] for key in tree.keys}


def test_given_lora_on_loraflow_targets_when_converted_then_every_name_is_an_sd_scripts_module(
    tree: UnetTree,
) -> None:
    # sd-scripts' LoRANetwork names `lora_unet_` + the SGM module path, `_`-joined (networks/lora.py,
    # create_modules); the SGM paths here are ComfyUI's (a port of its mapping), not the code under test.
    sgm_keys = comfyui_unet_to_diffusers(tree.config)
    targets = tuple(f".{target}" for target in SDXL.denoiser_target_modules)
    sd_scripts = {
        "lora_unet_" + module.replace(".", "_")
        for module in (sgm_keys[key].removesuffix(".weight") for key in tree.keys if key.endswith(".weight"))
        if ".transformer_blocks." in module and module.endswith(targets)
    }

    converted = _modules(sai_names(tree.kohya, tree.config))

    assert set(tree.keys) <= sgm_keys.keys()  # the ComfyUI port names every weight
    assert converted == sd_scripts
    assert len(converted) == len(_modules(tree.kohya)) == TARGETED_MODULES[tree.name]
    assert all(
        re.match(r"lora_unet_(input_blocks_\d+|middle_block|output_blocks_\d+)_1_", m) for m in converted
    )


def test_given_converted_lora_when_comfyui_maps_keys_then_every_module_hits_the_same_weight(
    tree: UnetTree,
) -> None:
    unet_map = comfyui_unet_to_diffusers(tree.config)
    key_map = comfyui_lora_key_map((unet_map[key] for key in tree.keys), unet_map)
    converted = sai_names(tree.kohya, tree.config)

    not_loaded = [key for key in converted if _module(key) not in key_map]
    weights = [
        (key_map[_module(new)], key_map[_module(old)]) for new, old in zip(converted, tree.kohya, strict=True)
    ]

    assert not_loaded == []
    assert all(new == old for new, old in weights)  # the weight the diffusers-path name patches


def test_given_converted_lora_when_a1111_finds_layers_then_every_module_found(tree: UnetTree) -> None:
    unet_map = comfyui_unet_to_diffusers(tree.config)
    layers = a1111_layer_names(unet_map[key] for key in tree.keys)
    converted = _modules(sai_names(tree.kohya, tree.config))

    found = {module: a1111_unet_module(module, layers) for module in converted}

    assert found == {module: module.replace("lora_unet_", "diffusion_model_", 1) for module in converted}


def test_given_sdxl_base_lora_when_a1111_finds_layers_then_old_and_new_names_reach_the_same_layer(
    base_tree: UnetTree,
) -> None:
    # A1111's own diffusers-name conversion assumes SD's 3 blocks per level: SDXL base has them.
    tree = base_tree
    unet_map = comfyui_unet_to_diffusers(tree.config)
    layers = a1111_layer_names(unet_map[key] for key in tree.keys)
    converted = sai_names(tree.kohya, tree.config)

    pairs = [
        (a1111_unet_module(_module(new), layers), a1111_unet_module(_module(old), layers))
        for new, old in zip(converted, tree.kohya, strict=True)
    ]

    assert all(new is not None and new == old for new, old in pairs)


def test_given_converted_lora_when_diffusers_reads_it_then_same_lora_as_diffusers_path_names(
    tree: UnetTree,
) -> None:
    converted = sai_names(tree.kohya, tree.config)

    # `load_lora_weights` reads kohya files through `lora_state_dict` (with the pipeline's UNet config).
    ours, our_alphas = StableDiffusionXLPipeline.lora_state_dict(dict(converted), unet_config=tree.config)
    theirs, their_alphas = StableDiffusionXLPipeline.lora_state_dict(
        dict(tree.kohya), unet_config=tree.config
    )

    assert ours.keys() == theirs.keys() and len(ours) == len(tree.kohya) * 2 // 3  # lora_A, lora_B
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert our_alphas == their_alphas


def test_given_tiny_sdxl_lora_when_kohya_file_has_sd_scripts_names_then_renders_as_diffusers_file(
    tiny_sdxl: Path, tmp_path: Path
) -> None:
    # Given a LoRA on the UNet and both text encoders, saved as loraflow saves it (sd-scripts' names),
    # and the same LoRA under diffusers' module names (the kohya file before it took sd-scripts' names)
    pipe = _load(StableDiffusionXLPipeline, tiny_sdxl)
    base = render_ohwx(pipe)
    _add_random_lora(pipe, ("unet", "text_encoder", "text_encoder_2"))
    saved = save_lora(tmp_path, pipe, OUTPUT_NAME, _metadata_inputs(str(tiny_sdxl)))
    diffusers_names = tmp_path / "diffusers-names.safetensors"
    write_kohya_file(diffusers_names, to_kohya_state_dict(trained_loras(pipe)), saved.metadata)

    # When each file is loaded into a fresh pipeline
    renders = []
    for weights in (saved.diffusers_file, diffusers_names, saved.kohya_file):
        fresh = _load(StableDiffusionXLPipeline, tiny_sdxl)
        fresh.load_lora_weights(tmp_path, weight_name=weights.name)
        renders.append(render_ohwx(fresh))
    from_diffusers, from_diffusers_names, from_sgm_names = renders

    # Then the same image, and the LoRA shows
    modules = _modules(load_file(saved.kohya_file))
    assert any(module.startswith("lora_unet_input_blocks_") for module in modules)
    assert not any("down_blocks" in module or "up_blocks" in module for module in modules)
    assert {module.split("_")[1] for module in modules} == {"unet", "te1", "te2"}
    assert _modules(sai_names(load_file(diffusers_names), pipe.unet.config)) == modules
    assert np.array_equal(from_sgm_names, from_diffusers_names)  # diffusers maps them to the same tensors
    assert np.abs(from_sgm_names - from_diffusers).max() < SAME_IMAGE
    assert np.abs(from_sgm_names - base).max() > 0.05


def test_given_lora_on_sdxl_bases_convolutions_when_clients_map_names_then_every_module_found() -> None:
    """LoCon (`network_args` conv_dim): the resnets' and samplers' layers, in sd-scripts' names, reach
    the same weight in ComfyUI as their diffusers-path names, and A1111 finds every one."""
    targets = (*SDXL.denoiser_target_modules, *SDXL.conv_target_modules, *SDXL.conv_block_modules)
    tree = _unet_tree("sdxl-base-1.0", SDXL_BASE_UNET_CONFIG, targets)
    unet_map = comfyui_unet_to_diffusers(tree.config)
    key_map = comfyui_lora_key_map((unet_map[key] for key in tree.keys), unet_map)
    layers = a1111_layer_names(unet_map[key] for key in tree.keys)
    converted = sai_names(tree.kohya, tree.config)

    modules = {_module(new): _module(old) for new, old in zip(converted, tree.kohya, strict=True)}

    # 17 resnets (conv1, conv2, time_emb_proj), 11 shortcuts, 2 down- and 2 upsamplers; 560 attention.
    assert len(modules) == 17 * 3 + 11 + 4 + TARGETED_MODULES["sdxl-base-1.0"]
    assert {new: key_map.get(new) for new in modules} == {new: key_map[old] for new, old in modules.items()}
    assert all(
        a1111_unet_module(new, layers) == new.replace("lora_unet_", "diffusion_model_", 1) for new in modules
    )
    assert "lora_unet_input_blocks_2_0_in_layers_2" in modules  # down_blocks.0.resnets.1.conv1
    assert "lora_unet_output_blocks_5_2_conv" in modules  # up_blocks.1.upsamplers.0.conv
