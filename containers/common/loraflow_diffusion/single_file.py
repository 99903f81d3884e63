"""Single-file checkpoints: write a diffusers SD 1.x or SDXL folder as one `.safetensors`/`.ckpt` in the
original (LDM/SGM, A1111, kohya, ComfyUI) key layout, and name the config folder that lets it load offline.

A single file carries weights but no configs; diffusers normally recognises an SD 1.5/SDXL checkpoint
and fetches its configs from the Hugging Face Hub. Offline, or for a model whose configs are not SD 1.5's
(the tiny pipeline), the configs travel beside the checkpoint: `<name>.safetensors` + `<name>.config/`, a
diffusers pipeline folder without weights (`model_index.json`, each component's config, tokenizer files).

Hand-written: no maintained library converts diffusers weights back to the original layout. The mapping
is the reverse of diffusers' `convert_ldm_*` and `convert_open_clip_checkpoint` loaders
(`diffusers/loaders/single_file_utils.py`) and follows diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` and `convert_diffusers_to_original_sdxl.py`
(Apache-2.0), generalised from the real models' fixed depths to whatever the UNet and VAE configs say.

Layouts: SD 1.x keeps its CLIP text encoder under `cond_stage_model.transformer.text_model.`. SDXL keeps
CLIP-L under `conditioner.embedders.0.transformer.text_model.` and OpenCLIP bigG under
`conditioner.embedders.1.model.` in OpenCLIP's own names (fused q/k/v `in_proj`, `text_projection`
stored as `x @ P`, the transpose of the Hugging Face linear weight); both UNets under
`model.diffusion_model.` (SDXL's size/crop micro-conditioning as `label_emb`), the VAE under
`first_stage_model.`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONFIG_DIR_SUFFIX = ".config"
# What diffusers itself fetches from the Hub as a single file's configs (`allow_patterns`).
_CONFIG_FILE_SUFFIXES = (".json", ".txt", ".model")

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_SD_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
_SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
_SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_SD_PIPELINE, _SDXL_PIPELINE = "StableDiffusionPipeline", "StableDiffusionXLPipeline"

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's micro-conditioning
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP_LEVEL = {
    "encoder.conv_norm_out.": "encoder.norm_out.",
    "decoder.conv_norm_out.": "decoder.norm_out.",
    **{
        name: name
        for name in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.")
    },
    **{name: name for name in ("quant_conv.", "post_quant_conv.")},
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP names of the Hugging Face CLIP text model's weights (keys without the `text_model.` level).
_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_CLIP_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_CLIP_QKV_KEY = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def config_dir_name(checkpoint_name: str) -> str:
    """`model.safetensors` -> `model.config`: the diffusers config folder that belongs to a checkpoint."""
    return PurePosixPath(checkpoint_name).stem + CONFIG_DIR_SUFFIX


def config_dir_for(checkpoint: Path) -> Path:
    return checkpoint.with_name(config_dir_name(checkpoint.name))


def save_single_file(pipeline_dir: Path, out_path: Path, *, with_config: bool = True) -> Path:
    """Write the SD 1.x or SDXL diffusers pipeline in `pipeline_dir` as one original-layout checkpoint.

    `.safetensors` or `.ckpt` (a pickle of `{"state_dict": ...}`, as A1111 writes), chosen by the suffix.
    With `with_config`, the pipeline's configs are copied to `config_dir_for(out_path)` so the file loads
    without the Hub. Returns `out_path`.
    """
    suffix = out_path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"{out_path.name!r}: a single-file checkpoint ends in one of {SINGLE_FILE_SUFFIXES}")
    text_encoders = _text_encoders_to_original(pipeline_dir, _pipeline_class_name(pipeline_dir))
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    state = {
        **_prefixed(_UNET_PREFIX, unet_to_original(unet)),
        **_prefixed(_VAE_PREFIX, vae_to_original(vae)),
        **text_encoders,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        save_file(state, str(out_path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, out_path)
    if with_config:
        _copy_configs(pipeline_dir, config_dir_for(out_path))
    return out_path


def _text_encoders_to_original(pipeline_dir: Path, class_name: str) -> dict[str, torch.Tensor]:
    if class_name == _SD_PIPELINE:
        text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
        return _prefixed(_SD_TEXT_ENCODER_PREFIX, clip_to_original(text_encoder))
    # SDXL (`_pipeline_class_name` admits no other): CLIP-L keeps Hugging Face's names, bigG OpenCLIP's.
    clip_l = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    big_g = CLIPTextModelWithProjection.from_pretrained(pipeline_dir, subfolder="text_encoder_2")
    return {
        **_prefixed(_SDXL_CLIP_L_PREFIX, clip_to_original(clip_l)),
        **_prefixed(_SDXL_OPEN_CLIP_PREFIX, open_clip_to_original(big_g)),
    }


@dataclass(frozen=True)
class _Module:
    """One diffusers module (a key prefix) and where it lives in the original layout."""

    diffusers: str
    original: str
    # Parameter names inside the module that differ between the layouts (first name parts).
    renames: Mapping[str, str] = field(default_factory=dict)
    # The original layout stores these linear weights as 1x1 convolutions (the VAE's attention).
    linear_as_conv: bool = False


def unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    layers = unet.config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("UNets with a different number of layers per block are not supported")
    state = unet.state_dict()
    modules = [_Module(d, o) for d, o in _UNET_TOP_LEVEL.items()]
    modules += _unet_down_modules(len(unet.config["block_out_channels"]), layers)
    modules += _unet_up_modules(len(unet.config["block_out_channels"]), layers, state)
    modules += [
        _Module("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        _Module("mid_block.attentions.0.", "middle_block.1."),
        _Module("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    return _convert(state, modules)


def _unet_down_modules(levels: int, layers: int) -> list[_Module]:
    # input_blocks.0 is conv_in; then per level: `layers` (resnet, attention) pairs and a downsampler slot.
    modules = []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        for layer in range(layers):
            block = f"input_blocks.{first + layer}"
            modules += [
                _Module(f"down_blocks.{level}.resnets.{layer}.", f"{block}.0.", _UNET_RESNET),
                _Module(f"down_blocks.{level}.attentions.{layer}.", f"{block}.1."),
            ]
        modules.append(
            _Module(f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{first + layers}.0.op.")
        )
    return modules


def _unet_up_modules(levels: int, layers: int, state: Mapping[str, torch.Tensor]) -> list[_Module]:
    # Per level `layers + 1` (resnet, attention) pairs; the upsampler follows the last pair (its attention).
    modules = []
    for level in range(levels):
        first = level * (layers + 1)
        for layer in range(layers + 1):
            block = f"output_blocks.{first + layer}"
            modules += [
                _Module(f"up_blocks.{level}.resnets.{layer}.", f"{block}.0.", _UNET_RESNET),
                _Module(f"up_blocks.{level}.attentions.{layer}.", f"{block}.1."),
            ]
        has_attention = any(key.startswith(f"up_blocks.{level}.attentions.") for key in state)
        slot = 2 if has_attention else 1
        modules.append(_Module(f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{first + layers}.{slot}."))
    return modules


def vae_to_original(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    levels = len(vae.config["block_out_channels"])
    resnets = vae.config["layers_per_block"] + 1  # the decoder's count; the encoder has one fewer
    modules = [_Module(d, o) for d, o in _VAE_TOP_LEVEL.items()]
    for level in range(levels):
        # The original decoder numbers its levels from the bottom (up.0 is the last, full-size one).
        original_up = f"decoder.up.{levels - 1 - level}"
        modules += [
            _Module(f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample."),
            _Module(f"decoder.up_blocks.{level}.upsamplers.0.", f"{original_up}.upsample."),
        ]
        for index in range(resnets):
            modules += [
                _Module(
                    f"encoder.down_blocks.{level}.resnets.{index}.",
                    f"encoder.down.{level}.block.{index}.",
                    _VAE_RESNET,
                ),
                _Module(
                    f"decoder.up_blocks.{level}.resnets.{index}.",
                    f"{original_up}.block.{index}.",
                    _VAE_RESNET,
                ),
            ]
    for part in ("encoder", "decoder"):
        modules += [
            _Module(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
            _Module(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
            _Module(
                f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION, linear_as_conv=True
            ),
        ]
    return _convert(vae.state_dict(), modules)


def clip_to_original(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP names, without the `text_model.` level (the caller's prefix holds it)."""
    # Recent transformers drop the `text_model.` level from CLIPTextModel's own names, older ones keep it.
    state = text_encoder.state_dict()
    return {key.removeprefix("text_model."): _standalone(value) for key, value in state.items()}


def open_clip_to_original(text_encoder: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """OpenCLIP names (SDXL's `conditioner.embedders.1.model.`); reverses `convert_open_clip_checkpoint`."""
    converted: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # in_proj key -> {"q"|"k"|"v": part}
    unclaimed = []
    for key, tensor in text_encoder.state_dict().items():
        name = key.removeprefix("text_model.")
        layer = _CLIP_LAYER_KEY.fullmatch(name)
        if name == "text_projection.weight":
            # OpenCLIP computes `pooled @ text_projection`. (diffusers' export script keeps the linear weight
            # as `text_projection.weight`, which neither its own loader nor kohya/ComfyUI read.)
            converted["text_projection"] = tensor.T
        elif name in _OPEN_CLIP_TOP_LEVEL:
            converted[_OPEN_CLIP_TOP_LEVEL[name]] = tensor
        elif layer and (qkv := _CLIP_QKV_KEY.fullmatch(layer[2])):
            fused.setdefault(f"transformer.resblocks.{layer[1]}.attn.in_proj_{qkv[2]}", {})[qkv[1]] = tensor
        elif layer and (renamed := _rename(layer[2], _OPEN_CLIP_LAYER)) != layer[2]:
            converted[f"transformer.resblocks.{layer[1]}.{renamed}"] = tensor
        else:
            unclaimed.append(key)
    if unclaimed:
        raise ValueError(f"{len(unclaimed)} weights have no OpenCLIP name, e.g. {unclaimed[:3]}")
    # torch.nn.MultiheadAttention's packing, which diffusers splits back in thirds: q, then k, then v.
    converted.update({key: torch.cat([parts[p] for p in "qkv"]) for key, parts in fused.items()})
    return {key: _standalone(value) for key, value in converted.items()}


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views and tensors that share memory: every saved weight gets its own storage.
    return tensor.detach().clone().contiguous()


def _convert(state: Mapping[str, torch.Tensor], modules: Iterable[_Module]) -> dict[str, torch.Tensor]:
    """Rename every key by the module holding it; a key no module claims is an error, never dropped."""
    ordered = list(modules)
    converted: dict[str, torch.Tensor] = {}
    unclaimed = []
    for key, tensor in state.items():
        module = next((m for m in ordered if key.startswith(m.diffusers)), None)
        if module is None:
            unclaimed.append(key)
            continue
        name = _rename(key[len(module.diffusers) :], module.renames)
        if module.linear_as_conv and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[module.original + name] = _standalone(tensor)
    if unclaimed:
        raise ValueError(f"{len(unclaimed)} weights have no original-layout name, e.g. {unclaimed[:3]}")
    return converted


def _rename(name: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def _pipeline_class_name(pipeline_dir: Path) -> str:
    index = json.loads((pipeline_dir / "model_index.json").read_text(encoding="utf-8"))
    class_name = index.get("_class_name")
    if class_name not in (_SD_PIPELINE, _SDXL_PIPELINE):
        raise ValueError(
            f"only {_SD_PIPELINE} and {_SDXL_PIPELINE} folders can be saved as one file, not {class_name!r}"
        )
    return str(class_name)


def _copy_configs(pipeline_dir: Path, config_dir: Path) -> None:
    def weights(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if (Path(folder) / n).is_file() and not n.endswith(_CONFIG_FILE_SUFFIXES)}

    if config_dir.exists():
        shutil.rmtree(config_dir)  # a stale config from an earlier save must not outlive its weights
    shutil.copytree(pipeline_dir, config_dir, ignore=weights)
