"""What a model family's specification says. One subclass of `ModelFamily` per family.

A family knows: how to recognise its models (a diffusers `model_index.json` class name, a key of its
single-file checkpoints) and load them; its components (the denoiser, UNet or transformer, the VAE,
the text encoders and tokenizers); how captions become the denoiser's conditioning (tokenize on the
host, encode with the text encoders, trainable when their LoRA is, add per-size conditioning) and how
images become latents; the training objective; the denoiser's forward; the LoRA target modules; the
export names and metadata; its memory footprint; and its defaults.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from loraflow_shared.dataset.config import TimestepSampling, TrainingConfig
from loraflow_shared.families import FamilyFacts

# What `load_pipeline` returns: one of the families' pipeline classes.
SupportedPipeline = (
    StableDiffusionPipeline
    | StableDiffusionXLPipeline
    | FluxPipeline
    | Flux2KleinPipeline
    | QwenImagePipeline
    | ZImagePipeline
)
Size = tuple[int, int]  # (width, height)
MIB = 1024**2
T = TypeVar("T")


@dataclass(frozen=True)
class TextEmbeddings:
    """The text encoders' output for a set of captions (first dimension = caption)."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL: the second encoder's projected pooled output
    # Any other per-caption tensor a family's conditioning needs (e.g. an attention mask), by name.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, indices: torch.Tensor) -> TextEmbeddings:
        return TextEmbeddings(
            self.hidden_states[indices],
            None if self.pooled is None else self.pooled[indices],
            {name: value[indices] for name, value in self.extras.items()},
        )

    @staticmethod
    def concatenated(parts: Sequence[TextEmbeddings]) -> TextEmbeddings:
        """The parts' captions, in order, as one set (all parts come from one family's encoders)."""
        pooled = [part.pooled for part in parts if part.pooled is not None]
        return TextEmbeddings(
            torch.cat([part.hidden_states for part in parts]),
            torch.cat(pooled) if pooled else None,
            {name: torch.cat([part.extras[name] for part in parts]) for name in parts[0].extras},
        )


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on for a batch (first dimension = sample)."""

    encoder_hidden_states: torch.Tensor
    # SDXL's micro-conditioning (`text_embeds`, `time_ids`); empty for SD 1.5.
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, indices: torch.Tensor) -> Conditioning:
        return Conditioning(
            self.encoder_hidden_states[indices],
            {name: value[indices] for name, value in self.added_cond_kwargs.items()},
        )


@dataclass(frozen=True)
class DdpmObjective:
    """Noise prediction over the base model's discrete DDPM schedule: epsilon or v, as its scheduler
    config says (SD 1.x/2.x, SDXL)."""


@dataclass(frozen=True)
class FlowMatchingObjective:
    """Rectified flow (FLUX, Qwen-Image, Z-Image): x_t = (1 - t) x + t noise, the denoiser predicts the
    velocity noise - x at t in [0, 1]. How t is sampled is the config's (`timestep_sampling`,
    `discrete_flow_shift`, `sigmoid_scale`, kohya sd-scripts' names); these are the family's defaults."""

    timestep_sampling: TimestepSampling = "sigmoid"
    discrete_flow_shift: float = 3.0
    sigmoid_scale: float = 1.0
    # The denoiser's `timestep` argument: t (FLUX's transformer takes t in [0, 1] and scales it itself).
    timestep_scale: float = 1.0


ObjectiveSpec = DdpmObjective | FlowMatchingObjective


@dataclass(frozen=True)
class Footprint:
    """Sizes of one family's reference model, for the memory plan. Activation bytes are per image at
    ``reference_side``², in fp16, with the family's LoRA targets (see `memory_plan` for how measured)."""

    denoiser_params: int
    text_encoder_params: int  # all text encoders together
    vae_params: int
    denoiser_lora_params_per_rank: int
    text_encoder_lora_params_per_rank: int
    vae_upcast: bool  # the VAE runs in fp32 whatever the training dtype
    reference_side: int
    denoiser_activation_bytes: int
    denoiser_checkpointed_activation_bytes: int
    text_encoder_activation_bytes: int  # forward + backward of the text encoders' LoRA, per caption
    vae_encode_bytes: int  # no-grad encoding, per image


@dataclass(frozen=True)
class ExportFacts:
    """What the kohya file's `ss_*`/`modelspec.*` metadata say about the base model."""

    base_model_version: str  # `ss_base_model_version` (A1111 shows the model's kind from it)
    architecture: str  # `modelspec.architecture` without the `/lora` suffix
    implementation: str  # `modelspec.implementation`
    sd_v2: bool  # `ss_v2`
    v_parameterization: bool  # `ss_v_parameterization`, `modelspec.prediction_type`


class ModelFamily(ABC):
    # What the Lambda functions know of the family too (`loraflow_shared.families`): `name`,
    # `pipeline_class_names` and, unless a spec says otherwise, `description` and the config claim come
    # from it, so a family is named once.
    facts: ClassVar[FamilyFacts]
    name: ClassVar[str]
    description: ClassVar[str]  # for messages: "an SDXL model"; default "a <label> model"
    # How a training config names this family: the key and the setting, e.g. "sdxl", "sdxl = true";
    # default `model_family = "<name>"`.
    config_key: ClassVar[str]
    config_claim: ClassVar[str]
    pipeline_class: ClassVar[type[SupportedPipeline]]
    # `_class_name` values in model_index.json that load as this family.
    pipeline_class_names: ClassVar[frozenset[str]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "facts" in cls.__dict__:
            cls.name = cls.facts.name
            cls.pipeline_class_names = cls.facts.pipeline_class_names
            own = cls.__dict__
            if "description" not in own:
                cls.description = f"a {cls.facts.label} model"
            if "config_key" not in own:
                cls.config_key = "model_family"
            if "config_claim" not in own:
                cls.config_claim = f'{cls.config_key} = "{cls.name}"'

    # A key only this family's single-file (original layout) checkpoints hold; diffusers' single-file
    # loader (`CHECKPOINT_KEY_NAMES`) tells the families apart by the same keys.
    single_file_marker_key: ClassVar[str]
    # Whether the pipeline's `from_single_file` loads the family's single-file checkpoints (SD's hold the
    # whole pipeline); the DiT families' single files hold the transformer alone: a diffusers folder it is.
    loads_single_file: ClassVar[bool] = False
    # Extra `from_pretrained` arguments (e.g. no safety checker: previews are of the user's own data).
    load_kwargs: ClassVar[dict[str, Any]] = {}
    # Pipeline attributes: the denoiser (UNet or transformer), then the text encoders and tokenizers.
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]]
    tokenizer_names: ClassVar[tuple[str, ...]]
    # The text encoders a LoRA may train (all of them unless the family says otherwise).
    trainable_text_encoder_names: ClassVar[tuple[str, ...] | None] = None
    # LoRA targets, after diffusers' LoRA training scripts for the family.
    denoiser_target_modules: ClassVar[tuple[str, ...]]
    text_encoder_target_modules: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "out_proj")
    # With kohya's `network_args` conv_dim (LoCon): the denoiser's 3x3 convolutions, at conv_dim/conv_alpha,
    # and the other layers of the blocks that hold them, at network_dim/alpha (sd-scripts' choice). Empty
    # for a family without convolutions to adapt (a transformer): conv_dim is then reported and ignored.
    conv_target_modules: ClassVar[tuple[str, ...]] = ()
    conv_block_modules: ClassVar[tuple[str, ...]] = ()
    # Image sides the denoiser takes: the VAE's factor, times the patch size of a packed-latent transformer.
    pixel_multiple: ClassVar[int] = 8
    # Whether kohya's `clip_skip` applies (SD 1.x only; kohya ignores it for SDXL).
    supports_clip_skip: ClassVar[bool] = False
    objective: ClassVar[ObjectiveSpec]
    footprint: ClassVar[Footprint]
    # Config keys that do not apply to this family: set, they are reported (SETTING_ADJUSTED) and ignored.
    ignored_config_keys: ClassVar[frozenset[str]] = frozenset()

    # -- components --------------------------------------------------------------------------------

    def denoiser(self, pipe: DiffusionPipeline) -> Any:
        """The denoiser (UNet or transformer) of `pipe`: the module the LoRA trains first."""
        return getattr(pipe, self.denoiser_name)

    @property
    def text_encoders_trainable(self) -> bool:
        """Whether a LoRA may train any text encoder (LLM encoders never are: captions encode once)."""
        return len(self.lora_components()) > 1

    def lora_components(self) -> tuple[str, ...]:
        """Pipeline attributes that may carry a LoRA, denoiser first."""
        trainable = self.trainable_text_encoder_names
        return (self.denoiser_name, *(self.text_encoder_names if trainable is None else trainable))

    def frozen_components(self) -> tuple[str, ...]:
        """Pipeline attributes frozen before the LoRA is added."""
        return (self.denoiser_name, "vae", *self.text_encoder_names)

    def text_encoders(self, pipe: DiffusionPipeline) -> list[Any]:
        """The pipeline's text encoders (transformers models, typed loosely by the libraries)."""
        return [getattr(pipe, name) for name in self.text_encoder_names]

    def latent_channels(self, pipe: DiffusionPipeline) -> int:
        """Channels of the latents the denoiser takes (before any packing)."""
        return int(pipe.vae.config.latent_channels)

    # -- text --------------------------------------------------------------------------------------

    def tokenize(self, pipe: DiffusionPipeline, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids `[N, L]` per tokenizer, padded and truncated as the pipelines do."""
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
        """The denoiser conditioning for a batch of images of one `size` (width, height)."""
        return Conditioning(text.hidden_states)

    def encode_prompts(
        self, pipe: DiffusionPipeline, prompts: Sequence[str], resolution: Size, clip_skip: int | None = None
    ) -> Conditioning:
        """Conditioning for prompts at `resolution`, on the pipeline's device, without guidance."""
        ids = [tokens.to(pipe.device) for tokens in self.tokenize(pipe, prompts)]
        text = self.encode_tokens(self.text_encoders(pipe), ids, clip_skip)
        return self.conditioning(text, resolution)

    # -- images ------------------------------------------------------------------------------------

    def encode_latents(
        self, pipe: DiffusionPipeline, pixels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """uint8 `[N,3,H,W]` images to the denoiser's latents (fp32), sampling the VAE posterior with
        `generator` and applying the VAE's shift and scale, as the family's pipeline undoes them."""
        vae = pipe.vae
        # A VAE whose config forces upcasting (SDXL's overflows in fp16) encodes in fp32.
        encode_dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else vae.dtype
        if vae.dtype != encode_dtype:
            vae.to(dtype=encode_dtype)
        images = (pixels.float() / 127.5 - 1.0).to(vae.device, encode_dtype)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator=generator).float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    # -- the denoiser ------------------------------------------------------------------------------

    def adopt_config(self, pipe: DiffusionPipeline, config: TrainingConfig) -> None:  # noqa: B027
        """Apply the config's family-specific settings to the loaded pipeline (e.g. a token limit); most
        families have none."""

    @abstractmethod
    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction for noisy latents `[N,C,H,W]` at `timesteps`; `guidance` is the
        config's `guidance_scale` for families that embed it (None: the family's default)."""

    # -- previews ----------------------------------------------------------------------------------

    def preview_arguments(self, pipe: DiffusionPipeline) -> dict[str, Any]:
        """Arguments of the pipeline's call beyond prompt, size, steps and seed, where its defaults do not
        render the way the model is meant to be sampled; most need none."""
        return {}

    # The call argument a request's `guidance` sets: classifier-free guidance, or the guidance a
    # guidance-distilled model embeds, in the pipeline's own sense.
    guidance_argument: ClassVar[str] = "guidance_scale"

    def sampling_arguments(
        self, pipe: DiffusionPipeline, negative_prompt: str | None = None, guidance: float | None = None
    ) -> dict[str, Any]:
        """`preview_arguments` with a request's negative prompt and guidance over them. A pipeline that
        takes no negative prompt refuses one (ValueError) rather than ignore it."""
        arguments = self.preview_arguments(pipe)
        if negative_prompt is not None:
            if not self.facts.takes_negative_prompt:  # the API refuses it first; a direct call too
                raise ValueError(f"{type(pipe).__name__} takes no negative prompt")
            arguments["negative_prompt"] = negative_prompt
        if guidance is not None:
            arguments[self.guidance_argument] = guidance
        return arguments

    # -- export ------------------------------------------------------------------------------------

    def kohya_names(self, pipe: DiffusionPipeline, state_dict: Mapping[str, T]) -> dict[str, T]:
        """The kohya-format state dict (diffusers' converter's keys) renamed as the family's community
        tools name its modules; the default keeps the converter's names."""
        return dict(state_dict)

    @abstractmethod
    def export_facts(self, pipe: DiffusionPipeline) -> ExportFacts:
        """What the exported LoRA's metadata say about this base model."""
