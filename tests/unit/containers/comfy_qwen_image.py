"""How ComfyUI holds a Qwen-Image transformer and finds a LoRA's modules in it, ported for the tests.

ComfyUI is not importable here. Each function follows ComfyUI's own code (hiddenswitch/pip-and-uv-installable-
ComfyUI, a packaged copy of comfyanonymous/ComfyUI, read at 87606c5): the model's weights are the modules its
`comfy/ldm/qwen_image/model.py` builds, under `diffusion_model.` (`comfy/model_base.py`); the LoRA key map is
`comfy/lora.py` `model_lora_keys_unet`. ComfyUI recognises the transformer by `txt_norm.weight`
(`comfy/model_detection.py`) and loads the published single files (Comfy-Org's `qwen_image_bf16.safetensors`,
diffusers' names) without converting a key. Applying a plain kohya LoRA (`load_lora`,
`LoRAAdapter.calculate_weight`) does not depend on the model: `lora_clients.comfyui_apply_lora` does it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

COMFY = "diffusion_model."  # ComfyUI's model keys: the diffusion model under this prefix
_FF_MULT = 4  # comfy's FeedForward(mult=4), GELU(approximate="tanh")
_TIME_CHANNELS = 256  # QwenTimestepProjEmbeddings: Timesteps(num_channels=256) -> TimestepEmbedding


def comfyui_qwen_image_weights(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight of ComfyUI's `QwenImageTransformer2DModel` (its `final_layer=True`, no additional t
    condition: Qwen-Image's), key (with `diffusion_model.`) -> shape, its arguments read off the diffusers
    transformer config (same names there: patch_size, in/out_channels, num_layers, attention_head_dim,
    num_attention_heads, joint_attention_dim)."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    head, text = int(config["attention_head_dim"]), int(config["joint_attention_dim"])
    out = int(config["patch_size"]) ** 2 * int(config["out_channels"] or config["in_channels"])
    weights = {
        **_linear("time_text_embed.timestep_embedder.linear_1", _TIME_CHANNELS, inner),
        **_linear("time_text_embed.timestep_embedder.linear_2", inner, inner),
        "txt_norm.weight": (text,),
        **_linear("img_in", int(config["in_channels"]), inner),
        **_linear("txt_in", text, inner),
        **_linear("norm_out.linear", inner, 2 * inner),  # LastLayer.linear; its LayerNorm has no weights
        **_linear("proj_out", inner, out),
    }
    for index in range(int(config["num_layers"])):
        weights |= _block(f"transformer_blocks.{index}.", inner, head)
    return {COMFY + key: shape for key, shape in weights.items()}


def _block(prefix: str, dim: int, head: int) -> dict[str, tuple[int, ...]]:
    """`QwenImageTransformerBlock`: modulations (`nn.Sequential(SiLU, Linear)`), LayerNorms without weights,
    the joint `Attention` (biases on, RMSNorms over one head), `FeedForward`s (`net.0.proj`, `net.2`)."""
    weights: dict[str, tuple[int, ...]] = {}
    for stream in ("img", "txt"):
        weights |= _linear(f"{stream}_mod.1", dim, 6 * dim)
        weights |= _linear(f"{stream}_mlp.net.0.proj", dim, _FF_MULT * dim)
        weights |= _linear(f"{stream}_mlp.net.2", _FF_MULT * dim, dim)
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        weights |= _linear(f"attn.{name}", dim, dim)
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        weights[f"attn.{name}.weight"] = (head,)
    return {prefix + key: shape for key, shape in weights.items()}


def _linear(name: str, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (out_features, in_features), f"{name}.bias": (out_features,)}


def comfyui_qwen_image_lora_key_map(model_keys: Iterable[str]) -> dict[str, str]:
    """ComfyUI's `model_lora_keys_unet` for a `QwenImage` model: LoRA module name -> model key.

    Its generic part (`lora_unet_` + the module path with `_`, the dotted path itself) and its QwenImage
    branch (dotted, `transformer.` + dotted, `lycoris_` + `_`-joined); its `unet_to_diffusers` table is empty
    for this model (no `num_res_blocks` in its unet_config)."""
    key_map: dict[str, str] = {}
    for key in model_keys:
        if not key.startswith(COMFY):
            continue
        if not key.endswith(".weight"):
            key_map[key] = key
            continue
        module = key.removeprefix(COMFY).removesuffix(".weight")
        key_map["lora_unet_" + module.replace(".", "_")] = key
        key_map[key.removesuffix(".weight")] = key
        key_map[module] = key
        key_map["transformer." + module] = key
        key_map["lycoris_" + module.replace(".", "_")] = key
    return key_map
