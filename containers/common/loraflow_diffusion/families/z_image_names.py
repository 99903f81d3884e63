"""ComfyUI's names for the kohya file's Z-Image transformer LoRA (`lora_unet_layers_0_attention_qkv`).

Why: the LoRA is trained on diffusers' `ZImageTransformer2DModel`, whose module paths diffusers' kohya
converter writes as `transformer_layers_0_attention_to_q`. ComfyUI holds Z-Image as its Lumina 2 `NextDiT`
(comfy/ldm/lumina/model.py: `layers.N.attention.qkv`, `attention.out`, `feed_forward.w1`,
`final_layer.linear`, `x_embedder`) and keys a kohya LoRA by `lora_unet_` + that model's own module path
(comfy/lora.py `model_lora_keys_unet`); its Lumina2 branch adds diffusers' paths only as
`transformer.`/`diffusion_model.`/`lycoris_`/bare dotted names (comfy/utils.py `z_image_to_diffusers`), so
`lora_unet_layers_0_attention_to_q` reaches nothing and ComfyUI only logs "lora key not loaded". musubi-tuner
writes exactly those names (`networks/lora_zimage.py`, prefix `lora_unet`) and ships
`networks/convert_z_image_lora_to_comfy.py` to turn them into ComfyUI's: `attention_to_out_0` ->
`attention_out` and q/k/v fused into `attention_qkv`. This module writes ComfyUI's names directly.

ComfyUI fuses what diffusers keeps apart: an attention's `qkv` holds `to_q|to_k|to_v`, `dim` rows each
(Z-Image has as many key/value heads as query heads). The fused LoRA is exact: its down is the parts' downs
stacked (rank = the sum of their ranks), its up the parts' ups block-diagonal, so `up @ down` is each part's
`up_i @ down_i` in its own rows; a part the LoRA did not train gets zero rows. ComfyUI scales a module by
`alpha / rank`: when every part has the same scale `s`, the fused alpha is `s * rank` (musubi's converter:
alpha * 3 for three equal parts); when the scales differ, each part's scale is folded into its rows of the up
and alpha = rank. diffusers' own Z-Image kohya loader (`_convert_non_diffusers_z_image_lora_to_diffusers`)
reads these names back, splitting `qkv` into q/k/v (0.42.1; it does not map `final_layer_*` or `x_embedder`,
which diffusers' default targets never train). The fusing is `flux_names`' (`kohya_bfl_names`, `fuse_loras`)
over ComfyUI's Z-Image module list."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loraflow_diffusion.families.flux_names import (
    BflModule,
    ModuleLora,
    fuse_loras,
    kohya_bfl_names,
    module_paths,
    plain_modules,
)

PATCH = (
    "2-1"  # ComfyUI's only patch layout (patch 2, frame patch 1): `all_x_embedder.2-1` is its `x_embedder`
)


def z_image_kohya_names(
    kohya_state_dict: Mapping[str, torch.Tensor], transformer_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The trainer's kohya dict (`convert_state_dict_to_kohya`'s keys) with the transformer's modules in
    ComfyUI's names, q/k/v fused exactly; other keys as they are. `transformer_config` is the
    `ZImageTransformer2DModel`'s config. Raises ValueError for a module ComfyUI has no name for, a key that
    is not a plain LoRA's, or shapes the config contradicts."""
    return kohya_bfl_names(kohya_state_dict, comfy_modules(transformer_config))


def comfy_loras(
    loras: Mapping[str, ModuleLora], transformer_config: Mapping[str, Any]
) -> dict[str, ModuleLora]:
    """diffusers module path -> its LoRA, to ComfyUI module path -> the (fused) LoRA, exactly equivalent."""
    return fuse_loras(loras, comfy_modules(transformer_config))


def comfy_modules(transformer_config: Mapping[str, Any]) -> list[BflModule]:
    """Every Linear of a diffusers Z-Image transformer with this config, grouped by the ComfyUI Linear holding
    it (ComfyUI's `z_image_to_diffusers` read backwards). Modules outside that table (another patch layout,
    Omni's SigLIP embedder and refiner) have no ComfyUI name."""
    dim, refiners = int(transformer_config["dim"]), int(transformer_config["n_refiner_layers"])
    modules = [
        *plain_modules("x_embedder", f"all_x_embedder.{PATCH}"),
        *plain_modules("final_layer.linear", f"all_final_layer.{PATCH}.linear"),
        *plain_modules("final_layer.adaLN_modulation.1", f"all_final_layer.{PATCH}.adaLN_modulation.1"),
        *(
            plain_modules(name, name)[0]
            for name in ("cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2")
        ),
    ]
    for index in range(int(transformer_config["n_layers"])):
        modules += _block(f"layers.{index}", dim, modulated=True)
    for index in range(refiners):
        modules += _block(f"noise_refiner.{index}", dim, modulated=True)
        modules += _block(f"context_refiner.{index}", dim, modulated=False)
    return modules


def _block(path: str, dim: int, modulated: bool) -> list[BflModule]:
    """A transformer block: the same paths in both layouts but the fused q/k/v and the output projection."""
    same = [f"{path}.feed_forward.w{index}" for index in (1, 2, 3)]
    same += [f"{path}.adaLN_modulation.0"] if modulated else []
    return [
        BflModule(
            f"{path}.attention.qkv", module_paths(f"{path}.attention.", "to_q", "to_k", "to_v"), (dim,) * 3
        ),
        *plain_modules(f"{path}.attention.out", f"{path}.attention.to_out.0"),
        *(plain_modules(name, name)[0] for name in same),
    ]
