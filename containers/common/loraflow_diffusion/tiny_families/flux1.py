"""Tiny FLUX.1 [dev] and [schnell]: CLIP-L (pooled) + T5 (sequence) text encoders, an MMDiT with double- and
single-stream blocks, FLUX's 16-channel VAE."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from loraflow_diffusion.tiny import clip_text_config as clip_config
from loraflow_diffusion.tiny_families._parts import FLUX_DYNAMIC_SHIFT, build, check_variant, flux_vae
from loraflow_diffusion.tiny_families._tokenizers import check_words, clip_tokenizer, t5_tokenizer

Flux1Variant = Literal["dev", "schnell"]

# Every attention projection of the double-stream blocks (image and text streams); the single-stream blocks'
# to_q/to_k/to_v match too (their output projection is the block's proj_out, shared with the MLP).
LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip

# FLUX.1 [schnell]'s scheduler_config.json: the same numbers, but a fixed shift of 1 (none).
SCHNELL_SHIFT = {**FLUX_DYNAMIC_SHIFT, "shift": 1.0, "use_dynamic_shifting": False}

_CLIP_HIDDEN = 32  # tiny.py's CLIP width: FLUX feeds its pooled output to the transformer
_T5_HIDDEN = 32
_HEAD_DIM = 16
_ROPE_AXES = (4, 6, 6)  # (text/id, height, width); must add up to the head dim, as FLUX's (16, 56, 56) to 128


def build_tiny_flux1(
    path: Path, seed: int = 0, words: Sequence[str] = (), variant: Flux1Variant = "dev"
) -> Path:
    """Write a tiny diffusers FLUX.1 pipeline to `path` (same seed, same weights) and return `path`.

    "dev" is guidance-distilled (the transformer embeds the guidance scale) with a resolution-dependent shift;
    "schnell" has no guidance embedding and a fixed schedule (shift 1), as the real scheduler configs.
    Each of `words` is one token in both tokenizers.
    """
    check_words(words)
    check_variant(variant, Flux1Variant)
    schedule = FLUX_DYNAMIC_SHIFT if variant == "dev" else SCHNELL_SHIFT

    def make() -> FluxPipeline:
        tokenizer, tokenizer_2 = clip_tokenizer(words), t5_tokenizer(words)
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**schedule),
            vae=flux_vae(),
            text_encoder=CLIPTextModel(clip_config(len(tokenizer), hidden_size=_CLIP_HIDDEN)),
            tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(len(tokenizer_2)),
            tokenizer_2=tokenizer_2,
            transformer=FluxTransformer2DModel(
                patch_size=1,
                in_channels=16 * 4,  # 2x2 patches of the VAE's 16 channels, packed
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=_HEAD_DIM,
                num_attention_heads=2,
                joint_attention_dim=_T5_HIDDEN,
                pooled_projection_dim=_CLIP_HIDDEN,
                guidance_embeds=variant == "dev",
                axes_dims_rope=_ROPE_AXES,
            ),
        )

    return build(path, seed, make)


def _t5_encoder(vocab_size: int) -> T5EncoderModel:
    """T5 v1.1's shape (gated GELU) as FLUX's T5-XXL encoder, without dropout."""
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=_T5_HIDDEN,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
        )
    )
