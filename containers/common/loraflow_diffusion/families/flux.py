"""FLUX.1 [dev] and [schnell]: a rectified-flow MMDiT on packed 16-channel latents, CLIP-L (pooled) and
T5-XXL (sequence) text encoders; [dev] embeds the guidance it was distilled with.

As diffusers' `train_dreambooth_lora_flux.py` and kohya sd-scripts' `flux_train_network.py` train it:
latents are `(x - shift) * scale` of FLUX's VAE, packed into 2x2 patches (`FluxPipeline._pack_latents`)
with their position ids, the transformer takes t in [0, 1], and its prediction is unpacked again, so the
objective sees `[N, 16, H/8, W/8]` like every other family. The LoRA trains the transformer (and, when
asked, CLIP-L; T5 is never trained, as in both scripts).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.families import facts_named

from loraflow_diffusion.families.base import (
    MIB,
    Conditioning,
    ExportFacts,
    FlowMatchingObjective,
    Footprint,
    ModelFamily,
    Size,
    T,
    TextEmbeddings,
)
from loraflow_diffusion.families.flux_names import flux_kohya_names

# kohya sd-scripts' defaults for FLUX.1 LoRA (its README's recommended settings): t drawn by "shift"
# with shift 3.1582, the raw velocity target, training guidance 1.0 for [dev].
FLUX_OBJECTIVE = FlowMatchingObjective(timestep_sampling="shift", discrete_flow_shift=3.1582)
TRAINING_GUIDANCE = 1.0
T5_MAX_TOKENS = 512  # FLUX.1 [dev]'s; sd-scripts use 256 for [schnell]
T5_MASK = "t5_attention_mask"  # the conditioning's key for T5's mask (`apply_t5_attn_mask`)
# The pipelines trained with `apply_t5_attn_mask` (set by `adopt_config`; a pipeline's own state, not the
# family's, which serves every run in the process).
_MASKED_T5: weakref.WeakSet[DiffusionPipeline] = weakref.WeakSet()

# Parameters: the published FLUX.1-dev configs (transformer/, text_encoder/, text_encoder_2/, vae/
# config.json) built on the meta device and counted: transformer 11.90B, CLIP-L 123.1M, T5-XXL encoder
# 4.76B, VAE 83.8M; LoRA parameters per rank: Σ (in + out) of the 342 targeted Linear layers.
# Activations: NOT measured yet (no GPU here); a deliberately high estimate scaled from SDXL's per-token
# measurement (4096 image tokens at 1024², 57 blocks of width 3072), so the plan errs towards saving memory.
FLUX1_FOOTPRINT = Footprint(
    denoiser_params=11_901_408_320,
    text_encoder_params=123_060_480 + 4_762_310_656,
    vae_params=83_819_683,
    denoiser_lora_params_per_rank=2_801_664,
    text_encoder_lora_params_per_rank=73_728,
    vae_upcast=False,
    reference_side=1024,
    denoiser_activation_bytes=20_480 * MIB,
    denoiser_checkpointed_activation_bytes=2_304 * MIB,
    text_encoder_activation_bytes=32 * MIB,
    vae_encode_bytes=1_280 * MIB,
)


class Flux1(ModelFamily):
    facts = facts_named("flux1")  # name, pipeline classes, compute: loraflow_shared.families
    pipeline_class = FluxPipeline
    # Per-block modulation: FLUX.2 files also hold `img_attn.qkv` but modulate globally (no `img_mod`).
    loads_single_file = True
    single_file_marker_key = "double_blocks.0.img_mod.lin.weight"
    denoiser_name = "transformer"
    pixel_multiple = 16  # VAE factor 8 x 2x2 patches
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    trainable_text_encoder_names = ("text_encoder",)
    # diffusers' train_dreambooth_lora_flux.py default: every attention projection of both streams.
    denoiser_target_modules = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )  # fmt: skip
    objective = FLUX_OBJECTIVE
    footprint = FLUX1_FOOTPRINT
    # clip_skip is SD 1.x's; Min-SNR weights an epsilon/v loss by the DDPM schedule's SNR.
    ignored_config_keys = frozenset({"clip_skip", "min_snr_gamma"})

    def tokenize(self, pipe: DiffusionPipeline, prompts: Sequence[str]) -> list[torch.Tensor]:
        """CLIP-L's 77 tokens and T5's up to 512, padded to their lengths, as `FluxPipeline.encode_prompt`;
        with `apply_t5_attn_mask`, T5's attention mask too (a third tensor)."""
        lengths = (pipe.tokenizer.model_max_length, min(T5_MAX_TOKENS, pipe.tokenizer_2.model_max_length))
        clip, t5 = (
            tokenizer(
                list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            )
            for tokenizer, length in zip((pipe.tokenizer, pipe.tokenizer_2), lengths, strict=True)
        )
        masked = [t5.attention_mask] if pipe in _MASKED_T5 else []
        return [clip.input_ids, t5.input_ids, *masked]

    def encode_tokens(
        self,
        text_encoders: Sequence[torch.nn.Module],
        token_ids: Sequence[torch.Tensor],
        clip_skip: int | None = None,
    ) -> TextEmbeddings:
        """T5's last hidden state is the sequence, CLIP-L's pooled output the global conditioning."""
        (clip, t5), (clip_ids, t5_ids, *mask) = text_encoders, token_ids
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output
        if not mask:
            return TextEmbeddings(t5(t5_ids, output_hidden_states=False)[0], pooled)
        hidden = t5(t5_ids, attention_mask=mask[0], output_hidden_states=False)[0]
        return TextEmbeddings(hidden, pooled, {T5_MASK: mask[0]})

    def conditioning(self, text: TextEmbeddings, size: Size) -> Conditioning:
        if text.pooled is None:
            raise ValueError("FLUX conditioning needs CLIP-L's pooled embedding")
        return Conditioning(text.hidden_states, {"pooled_projections": text.pooled, **text.extras})

    def adopt_config(self, pipe: DiffusionPipeline, config: TrainingConfig) -> None:
        if config.t5xxl_max_token_length is not None:
            pipe.tokenizer_2.model_max_length = config.t5xxl_max_token_length
        if config.apply_t5_attn_mask:
            _MASKED_T5.add(pipe)

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: float | None = None,
    ) -> torch.Tensor:
        batch, channels, height, width = noisy_latents.shape
        dtype = cast(torch.dtype, denoiser.dtype)
        packed = FluxPipeline._pack_latents(noisy_latents.to(dtype), batch, channels, height, width)
        device = noisy_latents.device
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(cond.encoder_hidden_states.shape[1], 3, device=device, dtype=dtype)
        embedded = None
        if denoiser.config.guidance_embeds:  # type: ignore[union-attr]  # ConfigMixin's FrozenDict
            scale = TRAINING_GUIDANCE if guidance is None else guidance
            embedded = torch.full((batch,), scale, device=device, dtype=torch.float32)
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(dtype),
            guidance=embedded,
            pooled_projections=cond.added_cond_kwargs["pooled_projections"].to(dtype),
            encoder_hidden_states=cond.encoder_hidden_states.to(dtype),
            txt_ids=text_ids,
            img_ids=image_ids,
            joint_attention_kwargs=_joint_mask(cond, packed.shape[1]),
            return_dict=False,
        )[0]
        # `_unpack_latents` takes the image size in pixels: latent size times the VAE's factor (8).
        return cast(torch.Tensor, FluxPipeline._unpack_latents(output, height * 8, width * 8, 8))

    def kohya_names(self, pipe: DiffusionPipeline, state_dict: Mapping[str, T]) -> dict[str, T]:
        """sd-scripts' BFL names (`lora_unet_double_blocks_0_img_attn_qkv`, ...), which ComfyUI, Forge and
        sd-scripts read: q/k/v (and the single blocks' MLP input) fused exactly, as BFL's weights are."""
        tensors = cast(Mapping[str, torch.Tensor], state_dict)
        return cast(dict[str, T], flux_kohya_names(tensors, pipe.transformer.config))

    def export_facts(self, pipe: DiffusionPipeline) -> ExportFacts:
        dev = bool(pipe.transformer.config.guidance_embeds)
        return ExportFacts(
            base_model_version="flux1",
            architecture="flux-1-dev" if dev else "flux-1-schnell",
            implementation="https://github.com/black-forest-labs/flux",
            sd_v2=False,
            v_parameterization=False,
        )


def _joint_mask(cond: Conditioning, image_tokens: int) -> dict[str, torch.Tensor] | None:
    """With T5's mask, the joint attention's (text tokens first, then every image token), as sd-scripts
    builds it: `[N, 1, 1, text + image]`, True where a key may be attended to; None without a mask."""
    text_mask = cond.added_cond_kwargs.get(T5_MASK)
    if text_mask is None:
        return None
    keys = torch.cat([text_mask.bool(), text_mask.new_ones((text_mask.shape[0], image_tokens)).bool()], dim=1)
    return {"attention_mask": keys[:, None, None, :]}
