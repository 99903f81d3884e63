"""sd-scripts' own names for an SDXL LoRA's UNet modules (`lora_unet_input_blocks_4_1_…`, `…middle_block…`).

Why: the kohya file's UNet keys come from diffusers' module paths (`lora_unet_down_blocks_1_attentions_0…`).
ComfyUI, A1111 and diffusers map those, but kohya's sd-scripts name an SDXL LoRA's modules after its own
UNet (`library/sdxl_original_unet.py`, Stability's SGM layout, "SAI" there) and match names literally:
`networks/sdxl_merge_lora.py`, resuming with `--network_weights` and releases before v0.9 skip every UNet
module whose name they do not know, without an error. ComfyUI, A1111 and diffusers read the SGM names as
well, so writing them keeps every client.

The mapping is sd-scripts' `library/sdxl_model_util.py` `make_unet_conversion_map`, the table that
`networks/lora.py` `convert_diffusers_to_sai_if_needed` applies to LoRA names. There the counts are fixed
to SDXL's (3 levels of 2 layers); here they are read from the UNet's config, as the original layout numbers
its blocks: `input_blocks.0` is `conv_in`, then per level one block per layer and one for the downsampler;
per level `layers + 1` output blocks, the upsampler in the last one after the resnet (and attention, if the
level has one). Names inside an attention block (`transformer_blocks.N.attn1.to_k`) are the same in both
layouts, so transformer depth does not enter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

UNET_PREFIX = "lora_unet_"
_SEP = "_"  # kohya's module names are module paths with the dots replaced

# Plain and cross-attention blocks: the only ones SDXL's UNet has (and the ones sd-scripts' layout knows).
_DOWN_BLOCKS = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type -> has attentions
_UP_BLOCKS = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_MID_BLOCK = "UNetMidBlock2DCrossAttn"

# diffusers -> SGM, dotted module prefixes (sd-scripts' table, `(sd, hf)` pairs there).
_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's size/crop micro-conditioning
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}

T = TypeVar("T")


def sai_names(kohya_state_dict: Mapping[str, T], unet_config: Mapping[str, Any]) -> dict[str, T]:
    """The kohya state dict with every `lora_unet_` key in sd-scripts' SDXL names; other keys (the text
    encoders' `lora_te1_`/`lora_te2_`) as they are. `unet_config` is the diffusers UNet's config
    (`pipe.unet.config`). Raises ValueError for a UNet module the layout has no name for."""
    prefixes = sai_prefixes(unet_config)
    return {sai_key(key, prefixes): value for key, value in kohya_state_dict.items()}


def sai_key(kohya_key: str, prefixes: Mapping[str, str]) -> str:
    """One kohya key (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`) in SGM names;
    `prefixes` from `sai_prefixes`. Keys of other components are returned as they are."""
    if not kohya_key.startswith(UNET_PREFIX):
        return kohya_key
    module, dot, suffix = kohya_key.removeprefix(UNET_PREFIX).partition(".")
    return UNET_PREFIX + sai_module(module, prefixes, _SEP) + dot + suffix


def sai_module(module: str, prefixes: Mapping[str, str], separator: str = ".") -> str:
    """A diffusers UNet module path in the SGM layout, its parts joined by `separator` ("." for a module
    path, "_" for a kohya name: `down_blocks_1_attentions_0_proj_in` -> `input_blocks_4_1_proj_in`)."""
    path = module + separator
    # Longest first, so no prefix stands in for a longer one; each ends in a separator (`…_1_` never `…_10_`).
    for diffusers, sgm in sorted(prefixes.items(), key=lambda item: -len(item[0])):
        source = diffusers.replace(".", separator)
        if path.startswith(source):
            return (sgm.replace(".", separator) + path.removeprefix(source)).removesuffix(separator)
    raise ValueError(f"UNet module {module!r} has no name in sd-scripts' SDXL layout")


def sai_prefixes(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> SGM module prefix (dotted, each ending in "."), for this UNet's blocks."""
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("UNets with a different number of layers per block have no SGM layout here")
    if unet_config.get("mid_block_type", _MID_BLOCK) != _MID_BLOCK:
        raise ValueError(f"mid block {unet_config['mid_block_type']!r}: only {_MID_BLOCK} is mapped")
    prefixes = dict(_TOP_LEVEL)
    prefixes |= _resnet("mid_block.resnets.0.", "middle_block.0.")
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    prefixes |= _resnet("mid_block.resnets.1.", "middle_block.2.")
    prefixes |= _down_prefixes(_attention_levels(unet_config["down_block_types"], _DOWN_BLOCKS), layers)
    prefixes |= _up_prefixes(_attention_levels(unet_config["up_block_types"], _UP_BLOCKS), layers)
    return prefixes


def _down_prefixes(attention: list[bool], layers: int) -> dict[str, str]:
    prefixes: dict[str, str] = {}
    for level, has_attention in enumerate(attention):
        first = 1 + level * (layers + 1)  # input_blocks.0 is conv_in
        for layer in range(layers):
            block = f"input_blocks.{first + layer}"
            prefixes |= _resnet(f"down_blocks.{level}.resnets.{layer}.", f"{block}.0.")
            if has_attention:
                prefixes[f"down_blocks.{level}.attentions.{layer}."] = f"{block}.1."
        if level < len(attention) - 1:  # the last level does not downsample
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{first + layers}.0.op."
    return prefixes


def _up_prefixes(attention: list[bool], layers: int) -> dict[str, str]:
    prefixes: dict[str, str] = {}
    for level, has_attention in enumerate(attention):
        first = level * (layers + 1)
        for layer in range(layers + 1):
            block = f"output_blocks.{first + layer}"
            prefixes |= _resnet(f"up_blocks.{level}.resnets.{layer}.", f"{block}.0.")
            if has_attention:
                prefixes[f"up_blocks.{level}.attentions.{layer}."] = f"{block}.1."
        if level < len(attention) - 1:  # the last level does not upsample
            slot = 2 if has_attention else 1  # after the block's resnet and attention
            prefixes[f"up_blocks.{level}.upsamplers.0."] = f"output_blocks.{first + layers}.{slot}."
    return prefixes


def _resnet(diffusers: str, sgm: str) -> dict[str, str]:
    return {diffusers + inner: sgm + renamed for inner, renamed in _RESNET.items()}


def _attention_levels(block_types: Sequence[str], known: Mapping[str, bool]) -> list[bool]:
    unknown = [block for block in block_types if block not in known]
    if unknown:
        raise ValueError(f"UNet blocks {unknown}: only {sorted(known)} are mapped")
    return [known[block] for block in block_types]
