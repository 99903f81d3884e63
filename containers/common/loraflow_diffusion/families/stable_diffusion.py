"""SD 1.x/2.x and SDXL: UNet denoisers on a DDPM schedule, CLIP text encoders."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from loraflow_shared.families import facts_named

from loraflow_diffusion.families.base import (
    MIB,
    Conditioning,
    DdpmObjective,
    ExportFacts,
    Footprint,
    ModelFamily,
    Size,
    T,
    TextEmbeddings,
)
from loraflow_diffusion.families.sdxl_names import sai_names

# Parameter counts: the published configs (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-
# xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/ config.json) built with diffusers 0.42 and
# transformers on PyTorch's meta device and counted; LoRA parameters per rank = Σ (in + out features)
# of the targeted Linear layers. SD 1.5: UNet 859.5M, CLIP-L 123.1M, VAE 83.7M. SDXL: UNet 2567.5M,
# CLIP-L + OpenCLIP-bigG 123.1M + 694.7M, VAE 83.7M.
# Activations: bytes of the tensors alive at the peak of one forward + backward (batch 1 and 2: linear
# in batch) of those real configs with a rank-16 LoRA, fp16, flash SDPA, tracked by a TorchDispatchMode
# on the meta device (torch 2.13). Resolution scaling was checked: 512² → 1024² multiplies them by 3.95-4.
SD15_FOOTPRINT = Footprint(
    denoiser_params=859_520_964,
    text_encoder_params=123_060_480,
    vae_params=83_653_863,
    denoiser_lora_params_per_rank=199_296,
    text_encoder_lora_params_per_rank=73_728,
    vae_upcast=False,
    reference_side=512,
    denoiser_activation_bytes=790 * MIB,
    denoiser_checkpointed_activation_bytes=221 * MIB,
    text_encoder_activation_bytes=32 * MIB,
    vae_encode_bytes=320 * MIB,
)
SDXL_FOOTPRINT = Footprint(
    denoiser_params=2_567_463_684,
    text_encoder_params=123_060_480 + 694_659_840,
    vae_params=83_653_863,
    denoiser_lora_params_per_rank=1_451_520,
    text_encoder_lora_params_per_rank=73_728 + 327_680,
    vae_upcast=True,
    reference_side=1024,
    denoiser_activation_bytes=5406 * MIB,
    denoiser_checkpointed_activation_bytes=523 * MIB,
    text_encoder_activation_bytes=(32 + 112) * MIB,
    vae_encode_bytes=1280 * MIB,
)


# Keys of the flow-matching families (FLUX, ...): nothing in a DDPM UNet's training uses them.
FLOW_MATCHING_KEYS = frozenset(
    {
        "guidance_scale",
        "timestep_sampling",
        "discrete_flow_shift",
        "sigmoid_scale",
        "model_prediction_type",
        "t5xxl_max_token_length",
        "apply_t5_attn_mask",
    }
)


class _UNetFamily(ModelFamily):
    """What SD 1.x/2.x and SDXL share: a conditional UNet predicting noise (or v) on a DDPM schedule."""

    denoiser_name = "unet"
    # The UNet's attention projections, as diffusers' train_dreambooth_lora scripts target them.
    denoiser_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    # sd-scripts' LoCon: every Conv2d 3x3 of ResnetBlock2D, Downsample2D and Upsample2D (their `conv`),
    # plus the resnets' time projection and 1x1 shortcut.
    conv_target_modules = ("conv1", "conv2", "conv")
    conv_block_modules = ("time_emb_proj", "conv_shortcut")
    objective = DdpmObjective()
    ignored_config_keys = FLOW_MATCHING_KEYS

    def latent_channels(self, pipe: DiffusionPipeline) -> int:
        return int(pipe.unet.config.in_channels)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: float | None = None,
    ) -> torch.Tensor:
        output = denoiser(
            noisy_latents,
            timesteps,
            encoder_hidden_states=cond.encoder_hidden_states,
            added_cond_kwargs=cond.added_cond_kwargs or None,
        )
        return cast(torch.Tensor, output.sample)

    @staticmethod
    def _v_prediction(pipe: DiffusionPipeline) -> bool:
        return bool(pipe.scheduler.config.get("prediction_type") == "v_prediction")


class StableDiffusion15(_UNetFamily):
    """SD 1.x/2.x: one CLIP text encoder, conditioning = its last hidden state."""

    facts = facts_named("sd15")  # name, pipeline classes, compute: loraflow_shared.families
    description = "an SD 1.x/2.x model"
    config_key = "sdxl"
    config_claim = "sdxl = false"
    pipeline_class = StableDiffusionPipeline
    loads_single_file = True
    single_file_marker_key = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"
    load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    supports_clip_skip = True
    footprint = SD15_FOOTPRINT

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

    def kohya_names(self, pipe: DiffusionPipeline, state_dict: Mapping[str, T]) -> dict[str, T]:
        # sd-scripts name a single text encoder `lora_te_` (diffusers' converter writes `lora_te1_`).
        return {_single_text_encoder(key): value for key, value in state_dict.items()}

    def export_facts(self, pipe: DiffusionPipeline) -> ExportFacts:
        v_prediction = self._v_prediction(pipe)
        # SD 2.x conditions on OpenCLIP-H (1024 wide); SD 1.x on CLIP-L (768). Both load as this family.
        sd_v2 = pipe.unet.config.cross_attention_dim == 1024
        if not sd_v2:
            return ExportFacts("sd_v1", "stable-diffusion-v1", "diffusers", False, v_prediction)
        architecture = "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        return ExportFacts("sd_v2", architecture, "diffusers", True, v_prediction)


def _single_text_encoder(key: str) -> str:
    return "lora_te_" + key.removeprefix("lora_te1_") if key.startswith("lora_te1_") else key


def _final_layer_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 flattened `CLIPTextModel` (no `.text_model`); older versions nest it."""
    text_model = getattr(encoder, "text_model", encoder)
    return cast(torch.nn.Module, text_model.final_layer_norm)


class StableDiffusionXL(_UNetFamily):
    """SDXL: two text encoders, plus pooled embeddings and size/crop time ids as added conditioning."""

    facts = facts_named("sdxl")  # name, pipeline classes, compute: loraflow_shared.families
    description = "an SDXL model"
    config_key = "sdxl"
    config_claim = "sdxl = true"
    pipeline_class = StableDiffusionXLPipeline
    loads_single_file = True
    single_file_marker_key = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    footprint = SDXL_FOOTPRINT
    ignored_config_keys = FLOW_MATCHING_KEYS | {"clip_skip"}  # kohya ignores clip_skip for SDXL

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

    def kohya_names(self, pipe: DiffusionPipeline, state_dict: Mapping[str, T]) -> dict[str, T]:
        # sd-scripts' own SDXL UNet names (its tools match them literally); `lora_te1_`/`lora_te2_` stay.
        return sai_names(state_dict, pipe.unet.config)

    def export_facts(self, pipe: DiffusionPipeline) -> ExportFacts:
        return ExportFacts(
            base_model_version="sdxl_base_v1-0",
            architecture="stable-diffusion-xl-v1-base",
            implementation="https://github.com/Stability-AI/generative-models",
            sd_v2=False,
            v_parameterization=self._v_prediction(pipe),
        )


@functools.lru_cache(maxsize=64)
def _time_ids(size: Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL's `[1, 6]` time ids for images resized and centre-cropped to `size`: original = target, crop
    at (0, 0). Cached: a host-to-GPU copy every step would stall the GPU queue."""
    width, height = size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype).to(device)
