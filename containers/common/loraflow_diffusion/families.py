"""One specification per model family: what differs between SD 1.5 and SDXL lives here, not in the loop.

A family knows its pipeline class, how to recognise its checkpoints (a diffusers `model_index.json`
class name, or keys of a single-file checkpoint) and how to turn captions into the UNet's conditioning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

# What `load_pipeline` returns: one of the families' pipeline classes.
SupportedPipeline = StableDiffusionPipeline | StableDiffusionXLPipeline


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for a set of samples (first dimension = sample), computed once before training."""

    encoder_hidden_states: torch.Tensor
    # SDXL's micro-conditioning (`text_embeds`, `time_ids`); empty for SD 1.5.
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, indices: torch.Tensor) -> Conditioning:
        return Conditioning(
            self.encoder_hidden_states[indices],
            {name: value[indices] for name, value in self.added_cond_kwargs.items()},
        )


class ModelFamily(ABC):
    name: ClassVar[str]
    pipeline_class: ClassVar[type[SupportedPipeline]]
    # `_class_name` values in model_index.json that load as this family.
    pipeline_class_names: ClassVar[frozenset[str]]
    # A key only this family's single-file (original LDM layout) checkpoints hold; diffusers'
    # single-file loader (`CHECKPOINT_KEY_NAMES`) tells the families apart by the same keys.
    single_file_marker_key: ClassVar[str]
    # Extra `from_pretrained` arguments (e.g. no safety checker: previews are of the user's own data).
    load_kwargs: ClassVar[dict[str, Any]] = {}

    @abstractmethod
    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: Sequence[str], resolution: tuple[int, int]
    ) -> Conditioning:
        """Text embeddings for each prompt, on the pipeline's device, without classifier-free guidance."""

    def predict(
        self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        output = unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=cond.encoder_hidden_states,
            added_cond_kwargs=cond.added_cond_kwargs or None,
        )
        return output.sample


class StableDiffusion15(ModelFamily):
    """SD 1.x/2.x: one CLIP text encoder, conditioning = its last hidden state."""

    name = "sd15"
    pipeline_class = StableDiffusionPipeline
    pipeline_class_names = frozenset({"StableDiffusionPipeline"})
    single_file_marker_key = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
    load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: Sequence[str], resolution: tuple[int, int]
    ) -> Conditioning:
        prompt_embeds, _ = pipe.encode_prompt(
            list(prompts), pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(prompt_embeds)


class StableDiffusionXL(ModelFamily):
    """SDXL: two text encoders, plus pooled embeddings and size/crop time ids as added conditioning."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_class_names = frozenset({"StableDiffusionXLPipeline"})
    single_file_marker_key = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: Sequence[str], resolution: tuple[int, int]
    ) -> Conditioning:
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        width, height = resolution
        # Images are resized and centre-cropped to the training size: original = target, crop at (0, 0).
        time_ids = pipe._get_add_time_ids(
            (height, width),
            (0, 0),
            (height, width),
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        time_ids = time_ids.to(pipe.device).repeat(len(prompts), 1)
        return Conditioning(prompt_embeds, {"text_embeds": pooled, "time_ids": time_ids})


FAMILIES: tuple[ModelFamily, ...] = (StableDiffusion15(), StableDiffusionXL())


def family_for_class_name(class_name: str) -> ModelFamily | None:
    return next((f for f in FAMILIES if class_name in f.pipeline_class_names), None)


def family_for_checkpoint_keys(keys: Collection[str]) -> ModelFamily | None:
    return next((f for f in FAMILIES if f.single_file_marker_key in keys), None)


def family_of(pipe: DiffusionPipeline) -> ModelFamily:
    family = family_for_class_name(type(pipe).__name__)
    if family is None:
        raise TypeError(f"{type(pipe).__name__} is not a supported model family")
    return family


def supported_class_names() -> list[str]:
    return sorted(name for family in FAMILIES for name in family.pipeline_class_names)
