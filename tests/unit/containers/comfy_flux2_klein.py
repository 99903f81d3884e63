"""ComfyUI's FLUX.2 model and LoRA key map, ported for tests (checked against diffusers' own converter).

ComfyUI recognises FLUX.2 in a checkpoint by `double_stream_modulation_img.lin.weight`
(comfy/model_detection.py, `image_model = "flux2"`) and builds `comfy.ldm.flux.model.Flux` with
`global_modulation` (shared modulations, no per-block `img_mod`/`modulation`), SwiGLU MLPs
(`mlp_silu_act`: the first Linear twice as wide), no biases (`qkv_bias`, `ops_bias` off), head dim 128
(`num_heads = hidden_size // sum(axes_dim)`, axes (32, 32, 32, 32)), MLP ratio 3, 256 timestep channels, 128
output channels. Its weights are Black Forest Labs' layout ("BFL") under `diffusion_model.`. The LoRA key map
(comfy/lora.py `model_lora_keys_unet`) names every model weight `lora_unet_<path with underscores>`, plus the
diffusers aliases of `comfy.utils.flux_to_diffusers` (ported in `lora_clients` without its FLUX.2 lines,
which only add aliases: `lora_unet_` names come from the model's own keys).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lora_clients import ComfyFluxTarget, comfyui_flux_lora_key_map, comfyui_flux_to_diffusers

COMFY = "diffusion_model."  # ComfyUI's prefix of the diffusion model's keys
_HEAD_DIM = 128  # sum of ComfyUI's FLUX.2 axes_dim (32, 32, 32, 32)
_MLP_RATIO = 3.0
_TIME_CHANNELS = 256  # MLPEmbedder(in_dim=256) for time_in and guidance_in
_OUT_CHANNELS = 128


@dataclass(frozen=True)
class ComfyFlux2Params:
    """What comfy/model_detection.py reads off a FLUX.2 checkpoint (the rest is fixed for FLUX.2)."""

    hidden_size: int
    in_channels: int
    context_in_dim: int
    depth: int
    depth_single_blocks: int
    guidance_embed: bool

    @property
    def num_heads(self) -> int:
        return self.hidden_size // _HEAD_DIM

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * _MLP_RATIO)


def comfyui_detect_flux2(shapes: Mapping[str, tuple[int, ...]]) -> ComfyFlux2Params:
    """comfy/model_detection.py's FLUX.2 branch on a BFL state dict's shapes (keys without a prefix)."""
    if "double_stream_modulation_img.lin.weight" not in shapes:
        raise ValueError("not a FLUX.2 checkpoint as ComfyUI detects one")
    img_in, txt_in = shapes["img_in.weight"], shapes["txt_in.weight"]
    return ComfyFlux2Params(
        hidden_size=img_in[0],
        in_channels=img_in[1],
        context_in_dim=txt_in[1],
        depth=_count_blocks(shapes, "double_blocks"),
        depth_single_blocks=_count_blocks(shapes, "single_blocks"),
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def comfyui_flux2_shapes(params: ComfyFlux2Params) -> dict[str, tuple[int, ...]]:
    """Every weight of ComfyUI's FLUX.2 model (`comfy.ldm.flux.model.Flux` and its layers), key -> shape,
    without the `diffusion_model.` prefix."""
    h, m = params.hidden_size, params.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "img_in.weight": (h, params.in_channels),
        "time_in.in_layer.weight": (h, _TIME_CHANNELS),
        "time_in.out_layer.weight": (h, h),
        "txt_in.weight": (h, params.context_in_dim),
        "final_layer.linear.weight": (_OUT_CHANNELS, h),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
        "double_stream_modulation_img.lin.weight": (6 * h, h),
        "double_stream_modulation_txt.lin.weight": (6 * h, h),
        "single_stream_modulation.lin.weight": (3 * h, h),
    }
    if params.guidance_embed:
        shapes |= {"guidance_in.in_layer.weight": (h, _TIME_CHANNELS), "guidance_in.out_layer.weight": (h, h)}
    for index in range(params.depth):
        for stream in ("img", "txt"):
            block = f"double_blocks.{index}.{stream}_"
            shapes |= {
                f"{block}attn.qkv.weight": (3 * h, h),
                f"{block}attn.norm.query_norm.scale": (_HEAD_DIM,),
                f"{block}attn.norm.key_norm.scale": (_HEAD_DIM,),
                f"{block}attn.proj.weight": (h, h),
                f"{block}mlp.0.weight": (2 * m, h),  # SwiGLU: gate and value halves
                f"{block}mlp.2.weight": (h, m),
            }
    for index in range(params.depth_single_blocks):
        block = f"single_blocks.{index}."
        shapes |= {
            f"{block}linear1.weight": (3 * h + 2 * m, h),
            f"{block}linear2.weight": (h, h + m),
            f"{block}norm.query_norm.scale": (_HEAD_DIM,),
            f"{block}norm.key_norm.scale": (_HEAD_DIM,),
        }
    return shapes


def comfyui_flux2_lora_key_map(
    model_keys: Iterable[str], transformer_config: Mapping[str, Any]
) -> dict[str, ComfyFluxTarget]:
    """`model_lora_keys_unet` for ComfyUI's FLUX.2 model: LoRA module name -> where it applies. `model_keys`
    carry the `diffusion_model.` prefix; `transformer_config` is the diffusers config the aliases read."""
    return comfyui_flux_lora_key_map(model_keys, comfyui_flux_to_diffusers(transformer_config, COMFY))


def bfl_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `Flux2Transformer2DModel` state dict in BFL's layout (what ComfyUI holds): diffusers'
    `convert_flux2_transformer_checkpoint_to_diffusers` backwards (q/k/v stacked, the final modulation's
    halves swapped, the rest renamed). Raises KeyError for a key it has no name for."""
    bfl: dict[str, torch.Tensor] = {}
    fused: set[tuple[str, str, str]] = set()
    for key, value in state.items():
        qkv = _QKV.match(key)
        if qkv:
            block, part, suffix = qkv.groups()
            fused.add((block, "img_attn" if part.startswith("to_") else "txt_attn", suffix))
        else:
            bfl[_bfl_name(key)] = _swap_halves(value) if key.startswith("norm_out.linear.") else value
    for block, attn, suffix in sorted(fused):
        parts = [state[f"transformer_blocks.{block}.attn.{name}.{suffix}"] for name in _QKV_NAMES[attn]]
        bfl[f"double_blocks.{block}.{attn}.qkv.{suffix}"] = torch.cat(parts)
    return bfl


def _bfl_name(key: str) -> str:
    for pattern, replacement in _RENAMES:
        renamed, count = pattern.subn(replacement, key)
        if count:
            return renamed
    raise KeyError(f"no BFL name for diffusers key {key!r}")


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first])


def _count_blocks(shapes: Mapping[str, Any], prefix: str) -> int:
    indices = {int(key.split(".")[1]) for key in shapes if key.startswith(f"{prefix}.")}
    return max(indices) + 1 if indices else 0


_QKV_NAMES = {"img_attn": ("to_q", "to_k", "to_v"), "txt_attn": ("add_q_proj", "add_k_proj", "add_v_proj")}
_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn\.(to_[qkv]|add_[qkv]_proj)\.(weight|bias)$")
# diffusers' FLUX2_TRANSFORMER_KEYS_RENAME_DICT and block key maps, read backwards.
_RENAMES = [
    (re.compile(rf"^{diffusers}\.(?P<end>weight|bias)$"), rf"{bfl}.\g<end>")
    for diffusers, bfl in {
        r"x_embedder": "img_in",
        r"context_embedder": "txt_in",
        r"time_guidance_embed\.timestep_embedder\.linear_1": "time_in.in_layer",
        r"time_guidance_embed\.timestep_embedder\.linear_2": "time_in.out_layer",
        r"time_guidance_embed\.guidance_embedder\.linear_1": "guidance_in.in_layer",
        r"time_guidance_embed\.guidance_embedder\.linear_2": "guidance_in.out_layer",
        r"double_stream_modulation_img\.linear": "double_stream_modulation_img.lin",
        r"double_stream_modulation_txt\.linear": "double_stream_modulation_txt.lin",
        r"single_stream_modulation\.linear": "single_stream_modulation.lin",
        r"proj_out": "final_layer.linear",
        r"norm_out\.linear": "final_layer.adaLN_modulation.1",
        r"transformer_blocks\.(\d+)\.attn\.to_out\.0": r"double_blocks.\g<1>.img_attn.proj",
        r"transformer_blocks\.(\d+)\.attn\.to_add_out": r"double_blocks.\g<1>.txt_attn.proj",
        r"transformer_blocks\.(\d+)\.ff\.linear_in": r"double_blocks.\g<1>.img_mlp.0",
        r"transformer_blocks\.(\d+)\.ff\.linear_out": r"double_blocks.\g<1>.img_mlp.2",
        r"transformer_blocks\.(\d+)\.ff_context\.linear_in": r"double_blocks.\g<1>.txt_mlp.0",
        r"transformer_blocks\.(\d+)\.ff_context\.linear_out": r"double_blocks.\g<1>.txt_mlp.2",
        r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj": r"single_blocks.\g<1>.linear1",
        r"single_transformer_blocks\.(\d+)\.attn\.to_out": r"single_blocks.\g<1>.linear2",
    }.items()
] + [
    (re.compile(rf"^{diffusers}\.weight$"), rf"{bfl}.scale")
    for diffusers, bfl in {
        r"transformer_blocks\.(\d+)\.attn\.norm_q": r"double_blocks.\g<1>.img_attn.norm.query_norm",
        r"transformer_blocks\.(\d+)\.attn\.norm_k": r"double_blocks.\g<1>.img_attn.norm.key_norm",
        r"transformer_blocks\.(\d+)\.attn\.norm_added_q": r"double_blocks.\g<1>.txt_attn.norm.query_norm",
        r"transformer_blocks\.(\d+)\.attn\.norm_added_k": r"double_blocks.\g<1>.txt_attn.norm.key_norm",
        r"single_transformer_blocks\.(\d+)\.attn\.norm_q": r"single_blocks.\g<1>.norm.query_norm",
        r"single_transformer_blocks\.(\d+)\.attn\.norm_k": r"single_blocks.\g<1>.norm.key_norm",
    }.items()
]
