"""How ComfyUI and A1111 find a kohya LoRA's UNet modules in an SDXL model, ported for the tests.

Each function follows its client's own code (cited), reduced to the UNet of a diffusers
`UNet2DConditionModel` config: no client is importable here, so the tests call these instead.
Both clients hold SDXL in Stability's SGM layout (`input_blocks.4.1.transformer_blocks.0.attn1.to_k`),
the layout sd-scripts' own SDXL UNet (`library/sdxl_original_unet.py`) has too.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

# ComfyUI comfy/utils.py: UNET_MAP_RESNET (SGM name -> diffusers name), UNET_MAP_ATTENTIONS,
# TRANSFORMER_BLOCKS and UNET_MAP_BASIC, as its `unet_to_diffusers` uses them.
_COMFY_RESNET = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
}
_COMFY_ATTENTION = ("proj_in", "proj_out", "norm")
_COMFY_TRANSFORMER_BLOCK = (
    *(f"norm{n}" for n in (1, 2, 3)),
    *(f"attn{n}.{p}" for n in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj",
    "ff.net.2",
)
_COMFY_BASIC = {
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}
_PARAMS = ("weight", "bias")


def comfyui_unet_to_diffusers(config: Mapping[str, Any]) -> dict[str, str]:
    """ComfyUI's `comfy.utils.unet_to_diffusers`: diffusers UNet key -> ComfyUI model key (SGM layout),
    with ComfyUI's `unet_config` (`num_res_blocks`, `transformer_depth`, …) read off the diffusers config."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    depth_in, depth_mid, depth_out = _comfy_transformer_depths(config)
    mapping: dict[str, str] = {}
    for x in range(levels):
        n = 1 + (layers + 1) * x
        for i in range(layers):
            mapping |= _comfy_resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            mapping |= _comfy_attention(
                f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depth_in.pop(0)
            )
            n += 1
        mapping |= _comfy_params(f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
    mapping |= _comfy_attention("mid_block.attentions.0", "middle_block.1", depth_mid)
    for i, n in enumerate([0, 2]):
        mapping |= _comfy_resnet(f"mid_block.resnets.{i}", f"middle_block.{n}")
    for x in range(levels):
        n = (layers + 1) * x
        for i in range(layers + 1):
            mapping |= _comfy_resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            depth = depth_out.pop()
            mapping |= _comfy_attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth)
            if i == layers:
                slot = 2 if depth > 0 else 1
                mapping |= _comfy_params(f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{n}.{slot}.conv")
            n += 1
    for sgm, diffusers in _COMFY_BASIC.items():
        mapping |= _comfy_params(diffusers, sgm)
    return mapping


def _comfy_transformer_depths(config: Mapping[str, Any]) -> tuple[list[int], int, list[int]]:
    """ComfyUI's `transformer_depth` (per input resnet), `transformer_depth_middle` and
    `transformer_depth_output` (per output block, popped from the end) for a diffusers config."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    depth = config["transformer_layers_per_block"]
    depths = [depth] * levels if isinstance(depth, int) else list(depth)
    down = ["CrossAttn" in block for block in config["down_block_types"]]
    up = ["CrossAttn" in block for block in config["up_block_types"]]
    depth_in = [depths[x] if down[x] else 0 for x in range(levels) for _ in range(layers)]
    # diffusers' up block x has the depth of down level `levels - 1 - x` (its reversed list).
    pops = [depths[levels - 1 - x] if up[x] else 0 for x in range(levels) for _ in range(layers + 1)]
    return depth_in, depths[-1], pops[::-1]


def _comfy_params(diffusers: str, sgm: str) -> dict[str, str]:
    return {f"{diffusers}.{param}": f"{sgm}.{param}" for param in _PARAMS}


def _comfy_resnet(diffusers: str, sgm: str) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for sgm_name, diffusers_name in _COMFY_RESNET.items():
        mapping |= _comfy_params(f"{diffusers}.{diffusers_name}", f"{sgm}.{sgm_name}")
    return mapping


def _comfy_attention(diffusers: str, sgm: str, depth: int) -> dict[str, str]:
    if depth == 0:
        return {}
    mapping: dict[str, str] = {}
    for name in _COMFY_ATTENTION:
        mapping |= _comfy_params(f"{diffusers}.{name}", f"{sgm}.{name}")
    for block in range(depth):
        for name in _COMFY_TRANSFORMER_BLOCK:
            inner = f"transformer_blocks.{block}.{name}"
            mapping |= _comfy_params(f"{diffusers}.{inner}", f"{sgm}.{inner}")
    return mapping


def comfyui_lora_key_map(model_keys: Iterable[str], unet_map: Mapping[str, str]) -> dict[str, str]:
    """ComfyUI's `comfy.lora.model_lora_keys_unet` for an SDXL model: LoRA module name -> model weight.
    `model_keys` are the model's UNet keys (SGM layout, without `diffusion_model.`), `unet_map` what
    `comfyui_unet_to_diffusers` returns. Both the SGM names and the diffusers-path names are accepted."""
    key_map: dict[str, str] = {}
    for key in model_keys:
        if key.endswith(".weight"):
            key_map["lora_unet_" + key.removesuffix(".weight").replace(".", "_")] = key
    for diffusers, sgm in unet_map.items():
        if diffusers.endswith(".weight"):
            key_map["lora_unet_" + diffusers.removesuffix(".weight").replace(".", "_")] = sgm
    return key_map


# A1111 extensions-builtin/Lora/networks.py: `suffix_conversion` and the UNet branches of
# `convert_diffusers_name_to_compvis` (SD 1.x's fixed 3 blocks per level, which SDXL's base shares).
_A1111_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_A1111_DOWN = re.compile(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_A1111_MID = re.compile(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")
_A1111_UP = re.compile(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")


def a1111_layer_names(model_keys: Iterable[str]) -> set[str]:
    """A1111's `network_layer_mapping` names for an SDXL UNet: `diffusion_model_` + module path, `_`-joined
    (`assign_network_names_to_compvis_modules` over `sd_model.model.named_modules()`)."""
    return {
        "diffusion_model_" + key.removesuffix(".weight").replace(".", "_")
        for key in model_keys
        if key.endswith(".weight")
    }


def a1111_unet_module(lora_module: str, layer_names: Collection[str]) -> str | None:
    """The layer A1111's `load_network` finds for a kohya UNet module name, None when it finds none: its
    diffusers-name conversion first, then (for SDXL LoRAs "with correct compvis keys") the name with
    `lora_unet` replaced by `diffusion_model`."""
    key = _a1111_diffusers_to_compvis(lora_module)
    if key in layer_names:
        return key
    key = lora_module.replace("lora_unet", "diffusion_model")
    return key if key in layer_names else None


def _a1111_diffusers_to_compvis(key: str) -> str:
    if match := _A1111_DOWN.match(key):
        level, kind, index, suffix = match.groups()
        block = 1 + int(level) * 3 + int(index)
        return f"diffusion_model_input_blocks_{block}_{_a1111_slot(kind)}_{_a1111_suffix(kind, suffix)}"
    if match := _A1111_MID.match(key):
        kind, index, suffix = match.groups()
        block = 1 if kind == "attentions" else int(index) * 2
        return f"diffusion_model_middle_block_{block}_{_a1111_suffix(kind, suffix)}"
    if match := _A1111_UP.match(key):
        level, kind, index, suffix = match.groups()
        block = int(level) * 3 + int(index)
        return f"diffusion_model_output_blocks_{block}_{_a1111_slot(kind)}_{_a1111_suffix(kind, suffix)}"
    return key


def _a1111_slot(kind: str) -> int:
    return 1 if kind == "attentions" else 0


def _a1111_suffix(kind: str, suffix: str) -> str:
    return _A1111_RESNET.get(suffix, suffix) if kind == "resnets" else suffix
