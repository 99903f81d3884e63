"""What a successful job leaves in the model dir (SageMaker tars it to `model.tar.gz`).

The LoRA twice: `pytorch_lora_weights.safetensors` in diffusers' format (what `load_lora_weights` and
the preview endpoint read) and `<output_name>.safetensors` in kohya's (what A1111/ComfyUI read), from
the same tensors; plus `training_report.json` (see `report`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from loraflow_diffusion.families import family_of
from peft import PeftConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel

from loraflow_training.kohya import (
    BaseModelFacts,
    ComponentLora,
    LoraMetadataInputs,
    kohya_metadata,
    to_kohya_state_dict,
    write_kohya_file,
)
from loraflow_training.report import REPORT_NAME, write_report

__all__ = ["LORA_WEIGHTS_NAME", "REPORT_NAME", "SavedLora", "save_lora", "trained_loras", "write_report"]

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_CLIP_PREFIX = "text_model."


@dataclass(frozen=True)
class SavedLora:
    diffusers_file: Path  # pytorch_lora_weights.safetensors
    kohya_file: Path  # <output_name>.safetensors
    components: tuple[str, ...]  # the pipeline components the LoRA holds, denoiser first
    metadata: dict[str, str]  # the kohya file's `ss_*`/`modelspec.*` metadata


def save_lora(
    model_dir: Path, pipe: DiffusionPipeline, output_name: str, metadata_inputs: LoraMetadataInputs
) -> SavedLora:
    """Write the trained LoRA (UNet and any trained text encoders) in diffusers' and kohya's formats."""
    family = family_of(pipe)
    loras = trained_loras(pipe)
    diffusers_file = save_diffusers_lora(model_dir, pipe, loras)
    metadata = kohya_metadata(metadata_inputs, base_model_facts(pipe, loras), output_name)
    kohya_file = model_dir / f"{output_name}.safetensors"
    write_kohya_file(kohya_file, family.kohya_names(pipe, to_kohya_state_dict(loras)), metadata)
    return SavedLora(diffusers_file, kohya_file, tuple(lora.name for lora in loras), metadata)


def save_diffusers_lora(model_dir: Path, pipe: DiffusionPipeline, loras: Sequence[ComponentLora]) -> Path:
    """`pipeline.load_lora_weights(model_dir)` reads it back.

    Keys stay in peft's layout (`unet.<module>.lora_A.weight`), which diffusers loads as is. Unlike
    `convert_state_dict_to_diffusers`' older `lora.down` layout, it round-trips every target module
    (that one garbles LoRAs on SD's 1x1-conv `proj_in`/`proj_out`).
    """
    layers: dict[str, Any] = {}
    for lora in loras:
        layers[f"{lora.name}_lora_layers"] = lora.state_dict
        # The adapter config (rank, alpha, targets) travels in the file's metadata: without it a loader
        # assumes alpha == rank and a LoRA trained with another alpha renders at the wrong strength.
        layers[f"{lora.name}_lora_adapter_metadata"] = lora.adapter_config
    family_of(pipe).pipeline_class.save_lora_weights(model_dir, weight_name=LORA_WEIGHTS_NAME, **layers)
    return model_dir / LORA_WEIGHTS_NAME


def trained_loras(pipe: DiffusionPipeline) -> list[ComponentLora]:
    """Every component of `pipe` that carries a LoRA adapter (one adapter each), in peft's layout."""
    loras = [
        _component_lora(name, module)
        for name in family_of(pipe).lora_components()
        if isinstance(module := getattr(pipe, name, None), torch.nn.Module)
        and getattr(module, "peft_config", None)
    ]
    if not loras:
        raise ValueError("the pipeline carries no LoRA adapter to save")
    return loras


def _component_lora(name: str, module: torch.nn.Module) -> ComponentLora:
    # peft/diffusers/transformers attach the adapters' configs as `peft_config` (nn.Module types it loosely).
    configs = cast(dict[str, PeftConfig], module.peft_config)
    adapters = list(configs)
    if len(adapters) != 1:
        raise ValueError(f"{name} carries {len(adapters)} LoRA adapters {adapters}; expected one")
    adapter = adapters[0]
    prefix = _module_prefix(module)
    state_dict = {
        prefix + key: tensor.detach().to("cpu").contiguous()
        for key, tensor in get_peft_model_state_dict(module, adapter_name=adapter).items()
    }
    alphas = {
        prefix + module_name: _kohya_alpha(layer, adapter)
        for module_name, layer in module.named_modules()
        if isinstance(layer, LoraLayer) and adapter in layer.r
    }
    return ComponentLora(name, state_dict, alphas, configs[adapter].to_dict())


def _module_prefix(module: torch.nn.Module) -> str:
    """transformers 5 flattened `CLIPTextModel` (no `text_model.` level); every LoRA loader in use
    (A1111, ComfyUI, diffusers with transformers 4) keys CLIP-L modules under `text_model.`, and
    diffusers drops the prefix again when it loads into a flattened model."""
    if isinstance(module, CLIPTextModel) and not hasattr(module, "text_model"):
        return _CLIP_PREFIX
    return ""


def _kohya_alpha(layer: LoraLayer, adapter: str) -> float:
    """kohya scales by alpha / rank; peft by alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    rank, alpha = layer.r[adapter], float(layer.lora_alpha[adapter])
    return alpha * math.sqrt(rank) if layer.use_rslora.get(adapter, False) else alpha


def base_model_facts(pipe: DiffusionPipeline, loras: Sequence[ComponentLora]) -> BaseModelFacts:
    # The denoiser's rank and alpha are the network's (sd-scripts use one dim/alpha for every component);
    # `trained_loras` lists it first.
    network = loras[0].adapter_config
    return BaseModelFacts(
        model=family_of(pipe).export_facts(pipe),
        network_dim=int(network["r"]),
        network_alpha=float(network["lora_alpha"]),
        network_args=_conv_args(network),
    )


def _conv_args(adapter_config: dict[str, Any]) -> dict[str, str]:
    """kohya's conv_dim/conv_alpha from the adapter's rank and alpha patterns (`network.lora_config` puts
    the convolutions' there, and nothing else); {} for a LoRA without them."""
    ranks, alphas = adapter_config.get("rank_pattern") or {}, adapter_config.get("alpha_pattern") or {}
    if not ranks:
        return {}
    rank, alpha = next(iter(ranks.values())), next(iter(alphas.values()))
    return {"conv_dim": str(rank), "conv_alpha": str(float(alpha))}
