"""The trained network: LoRA adapters on the denoiser (and the text encoders), as one module.

Targets are the family's (`ModelFamily.denoiser_target_modules`, `.text_encoder_target_modules`), after
diffusers' LoRA scripts. `LoraDenoiser` puts text encoding and the denoiser behind one `forward`, so
data-parallel training wraps both and keeps their gradients in sync.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from loraflow_diffusion.families import ModelFamily, Size, TextEmbeddings
from loraflow_shared.dataset.config import TrainingConfig
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from torch.nn.utils import parametrize

FP8_STORAGE = torch.float8_e4m3fn  # kohya's fp8_base format for frozen weights
STORED_WEIGHT = "parametrizations.weight.original"  # where a parametrized layer keeps its stored weight
ADAPTER_NAME = "default"  # what `add_adapter` names an adapter when given no name

# Cached text embeddings, or token ids (one tensor per text encoder) to encode in the step.
TextInput = TextEmbeddings | list[torch.Tensor]


def lora_config(config: TrainingConfig, targets: Sequence[str], convs: Sequence[str] = ()) -> LoraConfig:
    """A LoRA on `targets`; those of them in `convs` take kohya's conv_dim and conv_alpha."""
    conv = config.network_args
    return LoraConfig(
        r=config.network_dim,
        # kohya's alpha may be fractional; peft annotates int but only ever computes alpha / r.
        lora_alpha=config.network_alpha,  # type: ignore[arg-type]
        init_lora_weights="gaussian",
        target_modules=list(targets),
        # peft matches these names as whole trailing path parts (`conv` is a sampler's, never `conv1`).
        rank_pattern={name: conv.conv_dim for name in convs},
        alpha_pattern={name: conv.conv_scale_alpha for name in convs},
    )


def trains_convolutions(family: ModelFamily, config: TrainingConfig) -> bool:
    """kohya's LoCon: `network_args` conv_dim, on a family whose denoiser has convolutions."""
    return config.network_args.conv_dim is not None and bool(family.conv_target_modules)


def denoiser_targets(family: ModelFamily, config: TrainingConfig) -> tuple[str, ...]:
    return (*family.denoiser_target_modules, *_conv_targets(family, config))


def _conv_targets(family: ModelFamily, config: TrainingConfig) -> tuple[str, ...]:
    """LoCon's targets: the 3x3 convolutions (at conv_dim) and their blocks' other layers (network_dim)."""
    if not trains_convolutions(family, config):
        return ()
    return (*family.conv_target_modules, *family.conv_block_modules)


def trained_modules(pipe: DiffusionPipeline, family: ModelFamily, train_text: bool) -> dict[str, Any]:
    """Pipeline attribute name -> module, for every module that gets a LoRA (the denoiser first)."""
    names = family.lora_components() if train_text else (family.denoiser_name,)
    return {name: getattr(pipe, name) for name in names}


def target_modules(family: ModelFamily, config: TrainingConfig, train_text: bool) -> list[str]:
    """Every module name the run's LoRA targets (what a checkpoint's identity records)."""
    text = list(family.text_encoder_target_modules) if train_text else []
    return [*denoiser_targets(family, config), *text]


def add_lora(pipe: DiffusionPipeline, family: ModelFamily, config: TrainingConfig, train_text: bool) -> None:
    """Freeze everything, then add trainable fp32 LoRA adapters (frozen weights may be half precision)."""
    for name in family.frozen_components():
        getattr(pipe, name).requires_grad_(False)
    for name, module in trained_modules(pipe, family, train_text).items():
        if name == family.denoiser_name:
            targets = denoiser_targets(family, config)
            convs = tuple(name for name in family.conv_target_modules if name in targets)
            adapter = lora_config(config, targets, convs)
        else:
            adapter = lora_config(config, family.text_encoder_target_modules)
        module.add_adapter(adapter)
        cast_training_params(module, dtype=torch.float32)


def store_denoiser_in_fp8(pipe: DiffusionPipeline, family: ModelFamily) -> None:
    """kohya's fp8_base: the frozen denoiser's Linear and Conv2d weights stored in float8 (e4m3) and upcast
    to the compute dtype on each use, skipping what diffusers' layerwise casting deems precision-critical
    (norms, embeddings, the model's own patterns).

    A parametrization rather than diffusers' `enable_layerwise_casting`: its hooks cast the parameters back
    to float8 after each forward, under the tensors autograd saved for the backward pass, which then fails
    ("expected scalar type Float but found Float8_e4m3fn"). Here each use gets a fresh upcast copy."""
    denoiser = family.denoiser(pipe)
    computes_in = denoiser.dtype
    patterns = (*DEFAULT_SKIP_MODULES_PATTERN, *(denoiser._skip_layerwise_casting_patterns or ()))
    skipped = re.compile("|".join(patterns))
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and not skipped.search(name):
            module.weight = torch.nn.Parameter(module.weight.detach().to(FP8_STORAGE), requires_grad=False)
            parametrize.register_parametrization(module, "weight", _Upcast(computes_in), unsafe=True)
    # diffusers' `ModelMixin.dtype` is the first floating parameter's, which may now be float8 storage
    # (FLUX.2 klein's first layer has no bias): names matched here are skipped there, so the model and its
    # pipeline keep computing in `computes_in`.
    denoiser._keep_in_fp32_modules = [*(denoiser._keep_in_fp32_modules or ()), STORED_WEIGHT]


class _Upcast(torch.nn.Module):
    """`weight` as the layer computes with it: the stored float8 tensor in the compute dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def enable_gradient_checkpointing(pipe: DiffusionPipeline, family: ModelFamily, train_text: bool) -> None:
    family.denoiser(pipe).enable_gradient_checkpointing()
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
        denoiser: torch.nn.Module,
        text_encoders: Sequence[torch.nn.Module] = (),
        clip_skip: int | None = None,
        guidance: float | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        self.denoiser = denoiser
        self.guidance = guidance
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
        return self.family.predict(self.denoiser, noisy_latents, timesteps, cond, self.guidance)
