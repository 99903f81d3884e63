"""How ComfyUI and A1111 find a kohya LoRA's UNet modules in an SDXL model, ported for the tests.

Each function follows its client's own code (cited), reduced to the UNet of a diffusers
`UNet2DConditionModel` config: no client is importable here, so the tests call these instead.
Both clients hold SDXL in Stability's SGM layout (`input_blocks.4.1.transformer_blocks.0.attn1.to_k`),
the layout sd-scripts' own SDXL UNet (`library/sdxl_original_unet.py`) has too.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

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


# -- FLUX.1 ----------------------------------------------------------------------------------------------
# ComfyUI holds FLUX.1 in Black Forest Labs' layout ("BFL": `double_blocks.0.img_attn.qkv`, q/k/v fused) and
# builds its LoRA key map from that model's own state dict (comfy/lora.py `model_lora_keys_unet`), adding
# diffusers' names through comfy/utils.py `flux_to_diffusers` (diffusers key -> BFL key, with the rows of
# a fused weight a diffusers weight fills and `swap_scale_shift` for the final modulation). Ported for a
# diffusers `FluxTransformer2DModel` config; FLUX.2's, LyCORIS LoKr's and ControlNet's aliases are left out.


@dataclass(frozen=True)
class ComfyFluxTarget:
    """Where ComfyUI puts a diffusers FLUX weight (or a LoRA's delta): a key of its model (BFL layout),
    the rows `(start, size)` inside a fused weight (its `(0, start, size)` offset), whether halves swap."""

    key: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


def comfyui_flux_to_diffusers(
    config: Mapping[str, Any], output_prefix: str = ""
) -> dict[str, ComfyFluxTarget]:
    """ComfyUI's `comfy.utils.flux_to_diffusers`, its `mmdit_config` (`depth`, `depth_single_blocks`,
    `hidden_size`) read off the diffusers transformer config."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    key_map: dict[str, ComfyFluxTarget] = {}
    for index in range(config["num_layers"]):
        source, target = f"transformer_blocks.{index}.", f"{output_prefix}double_blocks.{index}."
        for end in _PARAMS:
            for fused, names in _COMFY_FLUX_QKV.items():
                for slot, name in enumerate(names):
                    key_map[f"{source}attn.{name}.{end}"] = ComfyFluxTarget(
                        f"{target}{fused}.{end}", (hidden * slot, hidden)
                    )
        for diffusers, bfl in _COMFY_FLUX_DOUBLE.items():
            key_map[source + diffusers] = ComfyFluxTarget(target + bfl)
    for index in range(config["num_single_layers"]):
        source, target = f"single_transformer_blocks.{index}.", f"{output_prefix}single_blocks.{index}."
        for end in _PARAMS:
            for slot, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
                key_map[f"{source}{name}.{end}"] = ComfyFluxTarget(
                    f"{target}linear1.{end}", (hidden * slot, hidden)
                )
            key_map[f"{source}proj_mlp.{end}"] = ComfyFluxTarget(
                f"{target}linear1.{end}", (hidden * 3, hidden * 4)
            )
        for diffusers, bfl in _COMFY_FLUX_SINGLE.items():
            key_map[source + diffusers] = ComfyFluxTarget(target + bfl)
    for bfl, diffusers in _COMFY_FLUX_BASIC.items():
        for end in _PARAMS:
            key_map[f"{diffusers}.{end}"] = ComfyFluxTarget(
                f"{output_prefix}{bfl}.{end}", swap_halves=bfl == "final_layer.adaLN_modulation.1"
            )
    return key_map


# Its fused q/k/v, `block_map`s (keys and values hold `.weight`/`.bias` there) and `MAP_BASIC` (BFL ->
# diffusers there).
_COMFY_FLUX_QKV = {
    "img_attn.qkv": ("to_q", "to_k", "to_v"),
    "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
_COMFY_FLUX_DOUBLE = {
    f"{diffusers}.{end}": f"{bfl}.{end}"
    for diffusers, bfl in {
        "attn.to_out.0": "img_attn.proj",
        "norm1.linear": "img_mod.lin",
        "norm1_context.linear": "txt_mod.lin",
        "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0",
        "ff_context.net.2": "txt_mlp.2",
    }.items()
    for end in _PARAMS
} | {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_COMFY_FLUX_SINGLE = {
    "norm.linear.weight": "modulation.lin.weight",
    "norm.linear.bias": "modulation.lin.bias",
    "proj_out.weight": "linear2.weight",
    "proj_out.bias": "linear2.bias",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}
_COMFY_FLUX_BASIC = {
    "final_layer.linear": "proj_out",
    "img_in": "x_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "txt_in": "context_embedder",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def comfyui_convert_diffusers_flux(
    state_dict: Mapping[str, torch.Tensor], flux_map: Mapping[str, ComfyFluxTarget]
) -> dict[str, torch.Tensor]:
    """ComfyUI's `comfy.utils.convert_diffusers_mmdit` for FLUX: a diffusers transformer state dict in its
    model's BFL layout (fused weights filled part by part, the final modulation's halves swapped)."""
    out: dict[str, torch.Tensor] = {}
    for key, target in flux_map.items():
        if key not in state_dict:
            continue
        weight = _swap_halves(state_dict[key]) if target.swap_halves else state_dict[key]
        if target.rows is None:
            out[target.key] = weight
            continue
        start, size = target.rows
        fused = out.get(target.key, torch.empty((0, *weight.shape[1:]), dtype=weight.dtype))
        if fused.shape[0] < start + size:  # grow it, as ComfyUI does
            grown = torch.empty((start + size, *weight.shape[1:]), dtype=weight.dtype)
            grown[: fused.shape[0]] = fused
            fused = grown
        fused[start : start + size] = weight
        out[target.key] = fused
    return out


def bfl_flux_to_diffusers(
    bfl_state: Mapping[str, torch.Tensor], flux_map: Mapping[str, ComfyFluxTarget]
) -> dict[str, torch.Tensor]:
    """The inverse of `comfyui_convert_diffusers_flux` (what diffusers' `convert_flux_transformer_checkpoint_
    to_diffusers` does, which fixes FLUX.1's 3072 width and so cannot convert a small model)."""
    state: dict[str, torch.Tensor] = {}
    for key, target in flux_map.items():
        if target.key not in bfl_state:
            continue
        weight = bfl_state[target.key]
        if target.rows is not None:
            start, size = target.rows
            weight = weight[start : start + size]
        state[key] = (_swap_halves(weight) if target.swap_halves else weight).clone()
    return state


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI's and diffusers' `swap_scale_shift` (its own inverse)."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def comfyui_flux_lora_key_map(
    model_keys: Iterable[str], flux_map: Mapping[str, ComfyFluxTarget]
) -> dict[str, ComfyFluxTarget]:
    """ComfyUI's `comfy.lora.model_lora_keys_unet` for a Flux model: LoRA module name -> where it applies.
    `model_keys` are the model's keys (`diffusion_model.` + BFL), `flux_map` what `comfyui_flux_to_diffusers`
    returns with `output_prefix="diffusion_model."`. Its first table, `unet_to_diffusers`, is empty for
    Flux (no `num_res_blocks` in its unet_config): diffusers-path `lora_unet_…` names find nothing."""
    key_map: dict[str, ComfyFluxTarget] = {}
    for key in model_keys:
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            module = key.removeprefix("diffusion_model.").removesuffix(".weight")
            key_map["lora_unet_" + module.replace(".", "_")] = ComfyFluxTarget(key)
            key_map[key.removesuffix(".weight")] = ComfyFluxTarget(key)
    for diffusers, target in flux_map.items():
        if diffusers.endswith(".weight"):
            module = diffusers.removesuffix(".weight")
            for name in (f"transformer.{module}", module):
                key_map[name] = target
            for prefix in ("lycoris_", "lora_transformer_"):
                key_map[prefix + module.replace(".", "_")] = target
    return key_map


def comfyui_apply_lora(
    weights: dict[str, torch.Tensor],
    lora: Mapping[str, torch.Tensor],
    key_map: Mapping[str, ComfyFluxTarget],
    strength: float = 1.0,
) -> list[str]:
    """ComfyUI's `load_lora` (plain kohya LoRAs: `.lora_up.weight`, `.lora_down.weight`, `.alpha`) and
    `LoRAAdapter.calculate_weight`: `W[rows] += strength * alpha / rank * up @ down` (rank = down's rows;
    no alpha: scale 1), in place. Returns the LoRA keys it did not load, which ComfyUI only logs."""
    loaded: set[str] = set()
    for name, target in key_map.items():
        up_key, down_key, alpha_key = f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"
        if up_key not in lora:
            continue
        up, down = lora[up_key].float(), lora[down_key].float()
        scale = lora[alpha_key].item() / down.shape[0] if alpha_key in lora else 1.0
        diff = (strength * scale) * (up @ down)
        weight = weights[target.key]
        view = weight if target.rows is None else weight[target.rows[0] : target.rows[0] + target.rows[1]]
        view += (_swap_halves(diff) if target.swap_halves else diff).to(weight.dtype)
        loaded |= {up_key, down_key} | ({alpha_key} if alpha_key in lora else set())
    return sorted(set(lora) - loaded)


# comfy/lora.py `LORA_CLIP_MAP` and `model_lora_keys_clip`'s CLIP-L names (SDXL's and FLUX's `clip_l`).
_COMFY_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def comfyui_clip_l_lora_names(layers: int) -> set[str]:
    """The kohya module names ComfyUI maps to a `clip_l` text encoder of `layers` layers."""
    return {
        f"{prefix}_text_model_encoder_layers_{layer}_{name}"
        for prefix in ("lora_te", "lora_te1")
        for layer in range(layers)
        for name in _COMFY_CLIP_MAP.values()
    }
