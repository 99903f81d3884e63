"""Tiny SD 1.5- and SDXL-architecture pipelines built from configs: for tests, the local cloud and the demo.

Same components and file layout as real checkpoints (VAE downsampling by 8, CLIP text encoders and
byte-level BPE tokenizers, UNet with cross-attention and, for SDXL, size/crop micro-conditioning), a
few MB of deterministic random weights, built in well under a second. Nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

# Imported from their modules, not `diffusers`: its lazy top level types every name as a dummy for mypy.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_pndm import PNDMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 77  # CLIP's context length; the tokenizer must know it or padding overflows
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_TEXT_HIDDEN = 32
# SDXL's second encoder (OpenCLIP bigG, 1280 wide) must differ in width from its first (CLIP-L, 768):
# diffusers' single-file loader tells the two apart in a checkpoint by their widths alone.
_SDXL_TEXT_2_HIDDEN = 48
_SDXL_TIME_EMBED_DIM = 8  # SDXL embeds 6 numbers (original size, crop corner, target size)


def build_tiny_sd(path: Path, seed: int = 0, words: Sequence[str] = ()) -> Path:
    """Write a tiny diffusers SD 1.5 pipeline to `path` (same seed, same weights) and return `path`.

    `words` are kept whole by the tokenizer, one token each, as a real CLIP vocabulary keeps common words;
    other text falls back to bytes (a word's prefix may still merge: "bluee" -> "blu", "e", "e</w>").
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer(words)
        pipe = StableDiffusionPipeline(
            vae=_tiny_vae(),
            text_encoder=_tiny_text_encoder(vocab_size=len(tokenizer)),
            tokenizer=tokenizer,
            unet=_tiny_unet(),
            scheduler=PNDMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                skip_prk_steps=True,
                set_alpha_to_one=False,
                steps_offset=1,
            ),
            # diffusers annotates these two as required, yet documents and accepts None.
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write a tiny diffusers SDXL pipeline to `path` (same seed, same weights) and return `path`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        pipe = StableDiffusionXLPipeline(
            vae=_tiny_vae(),
            text_encoder=_tiny_text_encoder(vocab_size=len(tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(
                clip_text_config(len(tokenizer), hidden_size=_SDXL_TEXT_2_HIDDEN)
            ),
            tokenizer=tokenizer,
            tokenizer_2=tiny_clip_tokenizer(),
            unet=_tiny_sdxl_unet(),
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
            ),
        )
    pipe.save_pretrained(path)
    return path


def _tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN + _SDXL_TEXT_2_HIDDEN,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        # 6 time ids x their embedding + the pooled projection of the second text encoder
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _SDXL_TEXT_2_HIDDEN,
    )


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,  # 64 px / 8
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )


def _tiny_vae() -> AutoencoderKL:
    # Four blocks: downsampling by 8, like the real SD VAE, so resolutions mean the same thing.
    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )


def _tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(clip_text_config(vocab_size))


def clip_text_config(
    vocab_size: int, hidden_size: int = _TEXT_HIDDEN, intermediate_size: int = 37
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden_size,  # as SDXL's bigG: the pooled projection keeps the width
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_clip_tokenizer(words: Sequence[str] = ()) -> CLIPTokenizer:
    """CLIP's byte-level BPE: every byte is a token, so any text encodes without <unk>, plus merges that
    join each of `words` (lower-case ASCII) into one token."""
    alphabet = _byte_alphabet()
    tokens = [_BOS, _EOS, *alphabet, *(symbol + "</w>" for symbol in alphabet)]
    merges = _word_merges(words)
    tokens += [
        token for token in dict.fromkeys(left + right for left, right in merges) if token not in tokens
    ]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), "utf-8")
        lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
        (Path(folder) / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def _word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges that build each word left to right: ("c", "a"), ("ca", "t</w>") for "cat"."""
    merges: dict[tuple[str, str], None] = {}
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        joined = symbols[0]
        for symbol in symbols[1:]:
            merges[(joined, symbol)] = None
            joined += symbol
    return list(merges)


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table: printable bytes map to themselves, the rest above U+0100."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
