"""How ComfyUI holds Z-Image and finds a LoRA's modules in it, ported for the tests (no ComfyUI here).

ComfyUI runs Z-Image as its Lumina 2 `NextDiT` (comfy/ldm/lumina/model.py; comfy/model_detection.py picks the
Z-Image config for `dim` 3840): the original Z-Image layout, q/k/v fused in `attention.qkv`, the output
projection `attention.out`, `x_embedder` and `final_layer` without diffusers' `all_…2-1` wrappers. Its LoRA
key map (comfy/lora.py `model_lora_keys_unet`) takes every model weight as `lora_unet_<path with underscores>`
and `diffusion_model.<path>`, and its Lumina2 branch adds diffusers' names through comfy/utils.py
`z_image_to_diffusers` (diffusers key -> ComfyUI key, with the rows `(0, start, size)` a q/k/v weight fills in
the fused one) as `diffusion_model.<diffusers>`, `transformer.<diffusers>`, `lycoris_<…>` and `<diffusers>`.
Ported from ComfyUI's source (the hiddenswitch/pip-and-uv-installable-ComfyUI fork, same files); applying a
plain LoRA (`load_lora`, `calculate_weight`) is `lora_clients.comfyui_apply_lora`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from lora_clients import ComfyFluxTarget as ComfyTarget
from lora_clients import comfyui_apply_lora

_PARAMS = ("weight", "bias")
# comfy/utils.py `z_image_to_diffusers`: `block_map` (diffusers -> ComfyUI, within a block) and `MAP_BASIC`
# (ComfyUI -> diffusers, outside the blocks).
_COMFY_BLOCK = {
    "attention.norm_q.weight": "attention.q_norm.weight",
    "attention.norm_k.weight": "attention.k_norm.weight",
    "attention.to_out.0.weight": "attention.out.weight",
    "attention.to_out.0.bias": "attention.out.bias",
    "attention_norm1.weight": "attention_norm1.weight",
    "attention_norm2.weight": "attention_norm2.weight",
    "feed_forward.w1.weight": "feed_forward.w1.weight",
    "feed_forward.w2.weight": "feed_forward.w2.weight",
    "feed_forward.w3.weight": "feed_forward.w3.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
_COMFY_ADALN = {
    "adaLN_modulation.0.weight": "adaLN_modulation.0.weight",
    "adaLN_modulation.0.bias": "adaLN_modulation.0.bias",
}
_COMFY_BASIC = {
    "final_layer.linear.weight": "all_final_layer.2-1.linear.weight",
    "final_layer.linear.bias": "all_final_layer.2-1.linear.bias",
    "final_layer.adaLN_modulation.1.weight": "all_final_layer.2-1.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias": "all_final_layer.2-1.adaLN_modulation.1.bias",
    "x_embedder.weight": "all_x_embedder.2-1.weight",
    "x_embedder.bias": "all_x_embedder.2-1.bias",
    "x_pad_token": "x_pad_token",
    "cap_embedder.0.weight": "cap_embedder.0.weight",
    "cap_embedder.1.weight": "cap_embedder.1.weight",
    "cap_embedder.1.bias": "cap_embedder.1.bias",
    "cap_pad_token": "cap_pad_token",
    "t_embedder.mlp.0.weight": "t_embedder.mlp.0.weight",
    "t_embedder.mlp.0.bias": "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight": "t_embedder.mlp.2.weight",
    "t_embedder.mlp.2.bias": "t_embedder.mlp.2.bias",
}


def comfyui_z_image_to_diffusers(
    config: Mapping[str, Any], output_prefix: str = ""
) -> dict[str, ComfyTarget]:
    """ComfyUI's `comfy.utils.z_image_to_diffusers`, its `mmdit_config` (`n_layers`, `dim`,
    `n_refiner_layers`) read off the diffusers `ZImageTransformer2DModel` config. As there, every block gets
    the `adaLN_modulation` entries, the context refiner's too (whose blocks have none: those keys never
    occur)."""
    hidden = int(config["dim"])
    key_map: dict[str, ComfyTarget] = {}

    def add_block_keys(source: str, target: str) -> None:
        for end in _PARAMS:
            qkv = f"{target}.attention.qkv.{end}"
            for slot, name in enumerate(("to_q", "to_k", "to_v")):
                key_map[f"{source}.attention.{name}.{end}"] = ComfyTarget(qkv, (hidden * slot, hidden))
        for diffusers, comfy in (_COMFY_BLOCK | _COMFY_ADALN).items():
            key_map[f"{source}.{diffusers}"] = ComfyTarget(f"{target}.{comfy}")

    for index in range(int(config["n_layers"])):
        add_block_keys(f"layers.{index}", f"{output_prefix}layers.{index}")
    for index in range(int(config["n_refiner_layers"])):
        add_block_keys(f"context_refiner.{index}", f"{output_prefix}context_refiner.{index}")
    for index in range(int(config["n_refiner_layers"])):
        add_block_keys(f"noise_refiner.{index}", f"{output_prefix}noise_refiner.{index}")
    for comfy, diffusers in _COMFY_BASIC.items():
        key_map[diffusers] = ComfyTarget(f"{output_prefix}{comfy}")
    return key_map


def comfyui_convert_diffusers_z_image(
    state_dict: Mapping[str, torch.Tensor], z_map: Mapping[str, ComfyTarget]
) -> dict[str, torch.Tensor]:
    """ComfyUI's `comfy.utils.convert_diffusers_mmdit` for Z-Image: a diffusers transformer state dict in its
    model's layout (the fused q/k/v weight filled part by part, grown as its parts arrive)."""
    out: dict[str, torch.Tensor] = {}
    for key, target in z_map.items():
        if key not in state_dict:
            continue
        weight = state_dict[key]
        if target.rows is None:
            out[target.key] = weight
            continue
        start, size = target.rows
        fused = out.get(target.key, torch.empty((0, *weight.shape[1:]), dtype=weight.dtype))
        if fused.shape[0] < start + size:
            grown = torch.empty((start + size, *weight.shape[1:]), dtype=weight.dtype)
            grown[: fused.shape[0]] = fused
            fused = grown
        fused[start : start + size] = weight
        out[target.key] = fused
    return out


def comfy_z_image_to_diffusers_state(
    comfy_state: Mapping[str, torch.Tensor], z_map: Mapping[str, ComfyTarget]
) -> dict[str, torch.Tensor]:
    """The inverse of `comfyui_convert_diffusers_z_image`: ComfyUI's (merged) weights back into a diffusers
    state dict, to run them in a `ZImageTransformer2DModel`."""
    state: dict[str, torch.Tensor] = {}
    for key, target in z_map.items():
        if target.key not in comfy_state:
            continue
        weight = comfy_state[target.key]
        if target.rows is not None:
            start, size = target.rows
            weight = weight[start : start + size]
        state[key] = weight.clone()
    return state


def comfyui_z_image_lora_key_map(
    model_keys: Iterable[str], z_map: Mapping[str, ComfyTarget]
) -> dict[str, ComfyTarget]:
    """ComfyUI's `comfy.lora.model_lora_keys_unet` for a Lumina2 (Z-Image) model: LoRA module name -> where it
    applies. `model_keys` are the model's keys (`diffusion_model.` + ComfyUI path), `z_map` what
    `comfyui_z_image_to_diffusers` returns with `output_prefix="diffusion_model."`. Its `unet_to_diffusers`
    table is empty for this model (no `num_res_blocks` in its unet_config)."""
    key_map: dict[str, ComfyTarget] = {}
    for key in model_keys:
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            module = key.removeprefix("diffusion_model.").removesuffix(".weight")
            key_map["lora_unet_" + module.replace(".", "_")] = ComfyTarget(key)
            key_map[key.removesuffix(".weight")] = ComfyTarget(key)
    for diffusers, target in z_map.items():
        if diffusers.endswith(".weight"):
            module = diffusers.removesuffix(".weight")
            for name in (f"diffusion_model.{module}", f"transformer.{module}", module):
                key_map[name] = target
            key_map["lycoris_" + module.replace(".", "_")] = target
    return key_map


def comfyui_merged(
    base: ZImageTransformer2DModel, kohya: Mapping[str, torch.Tensor]
) -> tuple[ZImageTransformer2DModel, list[str]]:
    """`base` with a kohya LoRA file merged as ComfyUI merges it (its layout, its key map, its weight patch),
    converted back to a diffusers model; and the file's keys ComfyUI did not load (it only logs them)."""
    z_map = comfyui_z_image_to_diffusers(base.config, "diffusion_model.")
    model = comfyui_convert_diffusers_z_image({k: v.clone() for k, v in base.state_dict().items()}, z_map)
    not_loaded = comfyui_apply_lora(model, kohya, comfyui_z_image_lora_key_map(model, z_map))
    merged = ZImageTransformer2DModel.from_config(base.config).eval()
    merged.load_state_dict(comfy_z_image_to_diffusers_state(model, z_map), strict=True)
    return merged, not_loaded
