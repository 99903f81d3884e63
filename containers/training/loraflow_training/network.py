"""The trained network: LoRA adapters on the UNet (and the text encoders), as one module.

Targets follow diffusers' LoRA scripts: the UNet's attention projections and the CLIP encoders'
self-attention projections. `LoraDenoiser` puts text encoding and the UNet behind one `forward`, so
data-parallel training wraps both and keeps their gradients in sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from loraflow_diffusion.families import ModelFamily, Size, TextEmbeddings
from loraflow_shared.dataset.config import TrainingConfig
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

UNET_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER_NAME = "default"  # what `add_adapter` names an adapter when given no name

# Cached text embeddings, or token ids (one tensor per text encoder) to encode in the step.
TextInput = TextEmbeddings | list[torch.Tensor]


def lora_config(config: TrainingConfig, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config.network_dim,
        # kohya's alpha may be fractional; peft annotates int but only ever computes alpha / r.
        lora_alpha=config.network_alpha,  # type: ignore[arg-type]
        init_lora_weights="gaussian",
        target_modules=targets,
    )


def trained_modules(pipe: DiffusionPipeline, family: ModelFamily, train_text: bool) -> dict[str, Any]:
    """Pipeline attribute name -> module, for every module that gets a LoRA."""
    names = ("unet", *family.text_encoder_names) if train_text else ("unet",)
    return {name: getattr(pipe, name) for name in names}


def add_lora(pipe: DiffusionPipeline, family: ModelFamily, config: TrainingConfig, train_text: bool) -> None:
    """Freeze everything, then add trainable fp32 LoRA adapters (frozen weights may be half precision)."""
    for name in ("unet", "vae", *family.text_encoder_names):
        getattr(pipe, name).requires_grad_(False)
    for name, module in trained_modules(pipe, family, train_text).items():
        targets = UNET_TARGET_MODULES if name == "unet" else TEXT_ENCODER_TARGET_MODULES
        module.add_adapter(lora_config(config, targets))
        cast_training_params(module, dtype=torch.float32)


def enable_gradient_checkpointing(pipe: DiffusionPipeline, family: ModelFamily, train_text: bool) -> None:
    pipe.unet.enable_gradient_checkpointing()
    if train_text:
        for encoder in family.text_encoders(pipe):
            # Non-reentrant: the encoders' frozen inputs carry no grad, which reentrant checkpoints need.
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def lora_state(modules: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The LoRA weights of each trained module (peft keys), detached copies on the CPU."""
    return {
        name: {key: value.detach().cpu().clone() for key, value in get_peft_model_state_dict(module).items()}
        for name, module in modules.items()
    }


def load_lora_state(modules: dict[str, Any], state: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, module in modules.items():
        result = set_peft_model_state_dict(module, state[name], adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint LoRA for {name} has unexpected keys: {unexpected[:3]}")


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in module.parameters() if param.requires_grad]


class LoraDenoiser(torch.nn.Module):
    """Predicts the training target from noisy latents and caption text (embeddings or token ids)."""

    def __init__(
        self,
        family: ModelFamily,
        unet: torch.nn.Module,
        text_encoders: Sequence[torch.nn.Module] = (),
        clip_skip: int | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        self.unet = unet
        self.text_encoders = torch.nn.ModuleList(text_encoders)
        self.clip_skip = clip_skip
        self.train_text = any(param.requires_grad for param in self.text_encoders.parameters())

    def forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: TextInput, size: Size
    ) -> torch.Tensor:
        if not isinstance(text, TextEmbeddings):
            # Frozen encoders (captions that vary per step) run without a graph.
            with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
                text = self.family.encode_tokens(list(self.text_encoders), text, self.clip_skip)
        cond = self.family.conditioning(text, size)
        return self.family.predict(self.unet, noisy_latents, timesteps, cond)
