"""Building blocks of the LoRA name tests of every family: LoRAs made with peft on small or meta-device
transformers, read the way the trainer reads them, and small LoRAs made by hand."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from loraflow_diffusion.families.flux_names import ModuleLora
from loraflow_training.kohya import to_kohya_state_dict
from loraflow_training.outputs import ComponentLora
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict


def linear_names(transformer: torch.nn.Module) -> list[str]:
    return [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]


def peft_lora(transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """peft's state dict (`<module>.lora_A.weight`) and each module's alpha, as the trainer reads them."""
    alphas = {
        name: float(layer.lora_alpha["default"])
        for name, layer in transformer.named_modules()
        if isinstance(layer, LoraLayer) and "default" in layer.r
    }
    return get_peft_model_state_dict(transformer), alphas


def trainer_kohya(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the trainer hands the family's `kohya_names`: diffusers' converter on the transformer's LoRA."""
    state, alphas = peft_lora(transformer)
    return to_kohya_state_dict([ComponentLora("transformer", state, alphas)])


def matching(patterns: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The patterns peft would apply to some of `names` (it warns about the others)."""
    return {key: value for key, value in patterns.items() if any(re.search(rf"{key}$", n) for n in names)}


def randomize(parameters: Iterable[torch.nn.Parameter], seed: int, std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def forward(transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        output: torch.Tensor = transformer(**inputs, return_dict=False)[0]
    return output


def kohya_modules(state: dict[str, torch.Tensor]) -> set[str]:
    return {key.partition(".")[0] for key in state}


def kohya_pair(module: str, in_features: int, out_features: int) -> dict[str, torch.Tensor]:
    return {
        f"{module}.lora_down.weight": torch.ones(2, in_features),
        f"{module}.lora_up.weight": torch.ones(out_features, 2),
        f"{module}.alpha": torch.tensor(2.0),
    }


def random_lora(in_features: int, out_features: int, rank: int, alpha: float, seed: int) -> ModuleLora:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, in_features, generator=generator)
    return ModuleLora(down, torch.randn(out_features, rank, generator=generator), alpha)


def delta(lora: ModuleLora) -> torch.Tensor:
    return lora.scale * lora.up @ lora.down
