"""Tiny Z-Image (Turbo and base): a Qwen3 text encoder read at its second-to-last layer, the single-stream
Z-Image DiT (text and image tokens refined apart, then attended jointly), FLUX's 16-channel VAE."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import Qwen3Model

from loraflow_diffusion.tiny_families._parts import build, check_variant, flux_vae, qwen3_config
from loraflow_diffusion.tiny_families._tokenizers import check_words, qwen_tokenizer

ZImageVariant = Literal["turbo", "base"]

# The two checkpoints share every config but the scheduler's fixed shift (Z-Image-Turbo 3.0, Z-Image 6.0);
# the rest (distillation, CFG or not, step count) is in their weights and in how they are called.
SHIFTS: dict[ZImageVariant, float] = {"turbo": 3.0, "base": 6.0}

# Every attention projection: the main layers' and both refiners' (noise and caption).
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")

_TEXT_HIDDEN = 16
_DIM = 32
_HEADS = 2
_ROPE_AXES = (4, 6, 6)  # (sequence, height, width); add up to the head dim, as Z-Image's (32, 48, 48) to 128


def build_tiny_z_image(
    path: Path, seed: int = 0, words: Sequence[str] = (), variant: ZImageVariant = "turbo"
) -> Path:
    """Write a tiny diffusers Z-Image pipeline to `path` (same seed, same weights) and return `path`.

    "turbo" and "base" differ only in the scheduler's shift (see SHIFTS). Each of `words` is one token.
    """
    check_words(words)
    check_variant(variant, ZImageVariant)

    def make() -> ZImagePipeline:
        tokenizer = qwen_tokenizer(words, qwen3=True)
        return ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=SHIFTS[variant], use_dynamic_shifting=False
            ),
            vae=flux_vae(),
            text_encoder=Qwen3Model(qwen3_config(tokenizer, layers=2, hidden=_TEXT_HIDDEN)),
            tokenizer=tokenizer,  # type: ignore[arg-type]  # annotated AutoTokenizer, a factory, not a class
            transformer=_transformer(),
        )

    return build(path, seed, make)


def _transformer() -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=_DIM,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=_HEADS,
        n_kv_heads=_HEADS,
        qk_norm=True,
        cap_feat_dim=_TEXT_HIDDEN,
        axes_dims=list(_ROPE_AXES),
    )
