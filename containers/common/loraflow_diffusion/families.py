"""One specification per model family: what differs between SD 1.5 and SDXL lives here, not in the loop.

A family knows its pipeline class, how to recognise its checkpoints (a diffusers `model_index.json`
class name, or keys of a single-file checkpoint), its text encoders, and how captions become the
UNet's conditioning: tokenize (host work), encode (the text encoders, trainable when their LoRA is),
then add per-size conditioning (SDXL's time ids).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

# What `load_pipeline` returns: one of the families' pipeline classes.
SupportedPipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class TextEmbeddings:
    """The text encoders' output for a set of captions (first dimension = caption)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL: the second encoder's projected pooled output

    def select(self, indices: torch.Tensor) -> TextEmbeddings:
        return TextEmbeddings(
            self.hidden_states[indices], None if self.pooled is None else self.pooled[indices]
        )


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on for a batch (first dimension = sample)."""

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
    # Pipeline attributes, in order: the text encoders and their tokenizers.
    text_encoder_names: ClassVar[tuple[str, ...]]
    tokenizer_names: ClassVar[tuple[str, ...]]
    # Whether kohya's `clip_skip` applies (SD 1.x only; kohya ignores it for SDXL).
    supports_clip_skip: ClassVar[bool]

    def text_encoders(self, pipe: DiffusionPipeline) -> list[Any]:
        """The pipeline's text encoders (transformers models, typed loosely by the libraries)."""
        return [getattr(pipe, name) for name in self.text_encoder_names]

    def tokenize(self, pipe: DiffusionPipeline, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids `[N, 77]` per tokenizer, padded and truncated as the pipelines do."""
        return [
            tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tokenizer in (getattr(pipe, name) for name in self.tokenizer_names)
        ]

    @abstractmethod
    def encode_tokens(
        self,
        text_encoders: Sequence[torch.nn.Module],
        token_ids: Sequence[torch.Tensor],
        clip_skip: int | None = None,
    ) -> TextEmbeddings:
        """Run the text encoders (on the ids' device); `clip_skip` in kohya's sense (1 = last layer)."""

    def conditioning(self, text: TextEmbeddings, size: Size) -> Conditioning:
        """The UNet conditioning for a batch of images of one `size` (width, height)."""
        return Conditioning(text.hidden_states)

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: Sequence[str], resolution: Size, clip_skip: int | None = None
    ) -> Conditioning:
        """Conditioning for prompts at `resolution`, on the pipeline's device, without guidance."""
        ids = [tokens.to(pipe.device) for tokens in self.tokenize(pipe, prompts)]
        text = self.encode_tokens(self.text_encoders(pipe), ids, clip_skip)
        return self.conditioning(text, resolution)

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
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    supports_clip_skip = True

    def encode_tokens(
        self,
        text_encoders: Sequence[torch.nn.Module],
        token_ids: Sequence[torch.Tensor],
        clip_skip: int | None = None,
    ) -> TextEmbeddings:
        (encoder,), (ids,) = text_encoders, token_ids
        if clip_skip is None or clip_skip == 1:
            return TextEmbeddings(encoder(ids)[0])  # last_hidden_state (after the final layer norm)
        # kohya: the hidden state `clip_skip` layers from the end, through the final layer norm.
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
        return TextEmbeddings(_final_layer_norm(encoder)(hidden))


def _final_layer_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 flattened `CLIPTextModel` (no `.text_model`); older versions nest it."""
    text_model = getattr(encoder, "text_model", encoder)
    return cast(torch.nn.Module, text_model.final_layer_norm)


class StableDiffusionXL(ModelFamily):
    """SDXL: two text encoders, plus pooled embeddings and size/crop time ids as added conditioning."""

    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_class_names = frozenset({"StableDiffusionXLPipeline"})
    single_file_marker_key = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    supports_clip_skip = False

    def encode_tokens(
        self,
        text_encoders: Sequence[torch.nn.Module],
        token_ids: Sequence[torch.Tensor],
        clip_skip: int | None = None,
    ) -> TextEmbeddings:
        """As `StableDiffusionXLPipeline.encode_prompt`: both penultimate layers, the second's pooled."""
        hidden_states, pooled = [], None
        for encoder, ids in zip(text_encoders, token_ids, strict=True):
            output = encoder(ids, output_hidden_states=True)
            if output[0].ndim == 2:  # the encoder with projection: its first output is pooled
                pooled = output[0]
            hidden_states.append(output.hidden_states[-2])
        return TextEmbeddings(torch.cat(hidden_states, dim=-1), pooled)

    def conditioning(self, text: TextEmbeddings, size: Size) -> Conditioning:
        if text.pooled is None:
            raise ValueError("SDXL conditioning needs the pooled text embeddings")
        time_ids = _time_ids(size, text.hidden_states.dtype, text.pooled.device)
        batch = len(text.hidden_states)
        return Conditioning(
            text.hidden_states, {"text_embeds": text.pooled, "time_ids": time_ids.expand(batch, -1)}
        )


@functools.lru_cache(maxsize=64)
def _time_ids(size: Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL's `[1, 6]` time ids for images resized and centre-cropped to `size`: original = target, crop
    at (0, 0). Cached: a host-to-GPU copy every step would stall the GPU queue."""
    width, height = size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).to(device)


FAMILIES: tuple[ModelFamily, ...] = (StableDiffusion15(), StableDiffusionXL())


def family_for_class_name(class_name: str) -> ModelFamily | None:
    return next((f for f in FAMILIES if class_name in f.pipeline_class_names), None)


def family_for_checkpoint_keys(keys: Collection[str]) -> ModelFamily | None:
    return next((f for f in FAMILIES if f.single_file_marker_key in keys), None)


def family_named(name: str) -> ModelFamily:
    return next(f for f in FAMILIES if f.name == name)


def family_of(pipe: DiffusionPipeline) -> ModelFamily:
    family = family_for_class_name(type(pipe).__name__)
    if family is None:
        raise TypeError(f"{type(pipe).__name__} is not a supported model family")
    return family


def supported_class_names() -> list[str]:
    return sorted(name for family in FAMILIES for name in family.pipeline_class_names)
