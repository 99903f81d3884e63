"""The FLUX.2 names for the kohya file's transformer LoRA (`lora_unet_double_blocks_0_img_attn_qkv`).

Why: the LoRA is trained on diffusers' `Flux2Transformer2DModel`, whose module paths diffusers' kohya
converter writes as `transformer_transformer_blocks_0_attn_to_q`. ComfyUI holds FLUX.2 in Black Forest Labs'
original layout ("BFL": `comfy/ldm/flux/model.py` with `global_modulation`, detected by
`comfy/model_detection.py` from `double_stream_modulation_img.lin.weight`) and maps a kohya LoRA by that
model's own weight names (`comfy/lora.py` `model_lora_keys_unet`: `lora_unet_` + the BFL path); its
diffusers-name aliases (`comfy/utils.py` `flux_to_diffusers`) are FLUX.1's names and do not cover the
FLUX.2 modules this LoRA trains. musubi-tuner (`networks/lora_flux_2.py`, prefix `lora_unet`) trains and
writes FLUX.2 LoRAs under the same BFL names, and diffusers' own kohya reader for FLUX.2
(`_convert_kohya_flux2_lora_to_diffusers`) reads them.

What BFL fuses that diffusers keeps apart is less than in FLUX.1: a double block's `img_attn.qkv` holds
`attn.to_q|to_k|to_v` and `txt_attn.qkv` holds `attn.add_q_proj|add_k_proj|add_v_proj` (rows stacked in that
order, fused exactly as `flux_names` explains); a single block's `linear1` and `linear2` are diffusers'
`attn.to_qkv_mlp_proj` and `attn.to_out` as they are, and the SwiGLU MLPs (`img_mlp.0` = `ff.linear_in`)
keep their row order. The modulations are shared by all blocks (`double_stream_modulation_img.lin` =
`double_stream_modulation_img.linear`); the final layer's `adaLN_modulation.1` holds (shift, scale) where
diffusers' `norm_out.linear` holds (scale, shift). The pairing is diffusers'
`convert_flux2_transformer_checkpoint_to_diffusers` (loaders/single_file_utils.py, BFL -> diffusers) read
backwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loraflow_diffusion.families.flux_names import (
    BflModule,
    embedder_modules,
    kohya_bfl_names,
    module_paths,
    plain_modules,
)


def flux2_kohya_names(
    kohya_state_dict: Mapping[str, torch.Tensor], transformer_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The trainer's kohya dict with the transformer's modules in FLUX.2's BFL names (`flux_kohya_names`
    for a `Flux2Transformer2DModel` with this config). Raises ValueError as `flux_kohya_names` does."""
    return kohya_bfl_names(kohya_state_dict, flux2_bfl_modules(transformer_config))


def flux2_bfl_modules(transformer_config: Mapping[str, Any]) -> list[BflModule]:
    """Every Linear of a diffusers FLUX.2 transformer with this config, grouped by the BFL Linear that
    holds it."""
    inner = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    modules = [
        *plain_modules("img_in", "x_embedder"),
        *plain_modules("txt_in", "context_embedder"),
        *embedder_modules("time_in", "time_guidance_embed.timestep_embedder"),
        *plain_modules("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
        *plain_modules("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
        *plain_modules("single_stream_modulation.lin", "single_stream_modulation.linear"),
        *plain_modules("final_layer.linear", "proj_out"),
        BflModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), (None,), swap_halves=True),
    ]
    if transformer_config.get("guidance_embeds", False):
        modules += embedder_modules("guidance_in", "time_guidance_embed.guidance_embedder")
    for index in range(int(transformer_config["num_layers"])):
        modules += _double_block(f"double_blocks.{index}.", f"transformer_blocks.{index}.", inner)
    for index in range(int(transformer_config["num_single_layers"])):
        bfl, diffusers = f"single_blocks.{index}.", f"single_transformer_blocks.{index}."
        modules += plain_modules(f"{bfl}linear1", f"{diffusers}attn.to_qkv_mlp_proj")
        modules += plain_modules(f"{bfl}linear2", f"{diffusers}attn.to_out")
    return modules


def _double_block(bfl: str, diffusers: str, inner: int) -> list[BflModule]:
    qkv = (inner, inner, inner)
    return [
        BflModule(f"{bfl}img_attn.qkv", module_paths(diffusers, "attn.to_q", "attn.to_k", "attn.to_v"), qkv),
        BflModule(
            f"{bfl}txt_attn.qkv",
            module_paths(diffusers, "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            qkv,
        ),
        *plain_modules(f"{bfl}img_attn.proj", f"{diffusers}attn.to_out.0"),
        *plain_modules(f"{bfl}txt_attn.proj", f"{diffusers}attn.to_add_out"),
        *plain_modules(f"{bfl}img_mlp.0", f"{diffusers}ff.linear_in"),
        *plain_modules(f"{bfl}img_mlp.2", f"{diffusers}ff.linear_out"),
        *plain_modules(f"{bfl}txt_mlp.0", f"{diffusers}ff_context.linear_in"),
        *plain_modules(f"{bfl}txt_mlp.2", f"{diffusers}ff_context.linear_out"),
    ]
