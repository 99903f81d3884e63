"""Tiny FLUX.2 [klein]: a Qwen3 text encoder read at three depths, the FLUX.2 MMDiT, the 32-channel FLUX.2
VAE whose batch-norm statistics normalise the patchified latents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import Qwen3ForCausalLM

from loraflow_diffusion.tiny_families._parts import (
    FLUX_DYNAMIC_SHIFT,
    VAE_BLOCKS,
    VAE_GROUPS,
    build,
    check_variant,
    qwen3_config,
)
from loraflow_diffusion.tiny_families._tokenizers import check_words, qwen_tokenizer

Flux2KleinVariant = Literal["distilled", "base"]

# The pipeline stacks the text encoder's hidden states at (9, 18, 27); diffusers' klein training script
# defaults to (10, 20, 30). 36 layers, as Qwen3-4B and -8B, serve both.
TEXT_ENCODER_LAYERS = 36
_TEXT_HIDDEN = 16
_OUT_LAYERS = 3  # hidden states stacked per token: the transformer's text width is 3x the encoder's
_LATENT_CHANNELS = 32
_NUM_SINGLE_LAYERS = 1
_HEAD_DIM = 16
_ROPE_AXES = (4, 4, 4, 4)  # (time, height, width, sequence): add up to the head dim, as (32,) * 4 to 128

# Every attention projection: the double-stream blocks' separate ones, and the single-stream blocks' fused
# QKV+MLP input and output (named per block, as diffusers' klein script does: `attn.to_out` alone would
# also match the double-stream blocks' ModuleList).
LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "to_qkv_mlp_proj", *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(_NUM_SINGLE_LAYERS)),
)  # fmt: skip


def build_tiny_flux2_klein(
    path: Path, seed: int = 0, words: Sequence[str] = (), variant: Flux2KleinVariant = "distilled"
) -> Path:
    """Write a tiny diffusers FLUX.2 [klein] pipeline to `path` (same seed, same weights) and return `path`.

    "distilled" (FLUX.2-klein-4B/9B) renders without classifier-free guidance; "base" (FLUX.2-klein-base)
    runs the negative pass when guidance_scale > 1. Both have no guidance embedding. Each of `words` is
    one token.
    """
    check_words(words)
    check_variant(variant, Flux2KleinVariant)

    def make() -> Flux2KleinPipeline:
        tokenizer = qwen_tokenizer(words, qwen3=True)
        return Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DYNAMIC_SHIFT),
            vae=_vae(),
            text_encoder=Qwen3ForCausalLM(qwen3_config(tokenizer, TEXT_ENCODER_LAYERS, _TEXT_HIDDEN)),
            tokenizer=tokenizer,
            transformer=Flux2Transformer2DModel(
                patch_size=1,
                in_channels=_LATENT_CHANNELS * 4,  # 2x2 patches of the VAE's latent channels
                num_layers=1,
                num_single_layers=_NUM_SINGLE_LAYERS,
                attention_head_dim=_HEAD_DIM,
                num_attention_heads=2,
                joint_attention_dim=_OUT_LAYERS * _TEXT_HIDDEN,
                timestep_guidance_channels=32,
                axes_dims_rope=_ROPE_AXES,
                guidance_embeds=False,
            ),
            is_distilled=variant == "distilled",
        )

    return build(path, seed, make)


def _vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=VAE_GROUPS,
        sample_size=1024,
    )
    # The statistics start at mean 0, variance 1, which would make the normalisation a no-op: give each
    # patchified channel a trained-looking mean and spread instead.
    channels = vae.bn.num_features
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(channels))
        vae.bn.running_var.copy_(torch.empty(channels).uniform_(0.5, 3.0))
    return vae
