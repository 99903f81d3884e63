"""What several tiny families share: the seeded build-and-save, FLUX's 16-channel VAE and scheduler, a
narrow Qwen3 text encoder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from transformers import Qwen3Config
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

# Four blocks: downsampling by 8 as in the real VAEs, so a resolution means the same latent size.
VAE_BLOCKS = (8, 16, 32, 32)
VAE_GROUPS = 8

# FLUX.1 [dev]'s scheduler_config.json: the shift grows with the image's token count (mu from 0.5 at 256
# tokens to 1.15 at 4096). FLUX.2 klein's pipeline always passes its own mu, so it needs dynamic shifting too.
FLUX_DYNAMIC_SHIFT: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def check_variant(variant: str, variants: Any) -> None:
    """Refuse a variant outside the `Literal` type `variants` (the type checker only sees literal calls)."""
    if variant not in get_args(variants):
        raise ValueError(f"variant must be one of {get_args(variants)}, got {variant!r}")


def build(path: Path, seed: int, make: Callable[[], DiffusionPipeline]) -> Path:
    """Build the pipeline from configs under `seed` (leaving the caller's global RNG untouched), save it to
    `path` and return `path`. Loading puts every model in eval mode; no model has dropout, so one a trainer
    puts in train mode computes the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = make()
    pipe.save_pretrained(path)
    return path


def flux_vae() -> AutoencoderKL:
    """FLUX.1's VAE shape (also Z-Image's): 16 latent channels, no quant convs, FLUX's scaling and shift."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=VAE_GROUPS,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def qwen3_config(tokenizer: Qwen2Tokenizer, layers: int, hidden: int) -> Qwen3Config:
    """A narrow Qwen3 (grouped-query attention, q/k norms, tied embeddings as Qwen3-4B) for `tokenizer`."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=40960,  # as Qwen3's: rotary, so no weights depend on it
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,  # <|endoftext|>, as Qwen3's config
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
