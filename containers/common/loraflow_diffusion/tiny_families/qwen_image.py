"""Tiny Qwen-Image: a Qwen2.5-VL text encoder (with a small vision tower, unused for text-to-image), the
Qwen-Image MMDiT, the Wan-style causal 3D VAE with per-channel latent statistics."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from loraflow_diffusion.tiny_families._parts import build
from loraflow_diffusion.tiny_families._tokenizers import check_words, qwen_tokenizer

# The pipeline wraps each prompt in this system prompt and drops its first 34 token positions from the
# encoder's output: the tokenizer must give this prefix exactly that many tokens, as Qwen's real one does.
PROMPT_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text,"
    " spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
_PREFIX_WORDS = tuple(dict.fromkeys(re.findall("[A-Za-z]+", re.sub(r"<\|\w+\|>", "", PROMPT_PREFIX))))

# Qwen-Image's scheduler_config.json: a dynamic shift (mu from 0.5 at 256 tokens to 0.9 at 8192), stretched
# so the last sigma is 0.02.
SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# Every attention projection of the joint (image + text) attention.
LORA_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip

_TEXT_HIDDEN = 32
_TEXT_HEADS = 2
_HEAD_DIM = 16
_ROPE_AXES = (4, 6, 6)  # (frame, height, width); add up to the head dim, as Qwen-Image's (16, 56, 56) to 128


def build_tiny_qwen_image(path: Path, seed: int = 0, words: Sequence[str] = ()) -> Path:
    """Write a tiny diffusers Qwen-Image pipeline to `path` (same seed, same weights) and return `path`.

    Each of `words` is one token, and the pipeline's 34-token system prefix is 34 tokens.
    """
    check_words(words)

    def make() -> QwenImagePipeline:
        tokenizer = qwen_tokenizer(words, qwen3=False, keep=_PREFIX_WORDS)
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
            vae=AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1),
            text_encoder=Qwen2_5_VLForConditionalGeneration(_text_encoder_config(tokenizer)),
            tokenizer=tokenizer,
            transformer=QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=16 * 4,  # 2x2 patches of the VAE's 16 channels, packed
                out_channels=16,
                num_layers=1,
                attention_head_dim=_HEAD_DIM,
                num_attention_heads=2,
                joint_attention_dim=_TEXT_HIDDEN,
                axes_dims_rope=_ROPE_AXES,
            ),
        )
        _require_prefix_length(pipe)
        return pipe

    return build(path, seed, make)


def _text_encoder_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    ids = {
        name: _token_id(tokenizer, f"<|{name}|>")
        for name in ("image_pad", "video_pad", "vision_start", "vision_end")
    }
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),  # only read here: a top-level vocab_size is ignored
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 2 * _TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": _TEXT_HEADS,
            "num_key_value_heads": 1,
            # Multimodal rotary sections (time, height, width) add up to half the head dim, as (16, 24, 24)
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 1_000_000.0,
            },
            "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": _TEXT_HIDDEN,  # the vision merger writes into the text stream
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["image_pad"],
        video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )


def _token_id(tokenizer: Qwen2Tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def _require_prefix_length(pipe: QwenImagePipeline) -> None:
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    if not template.startswith(PROMPT_PREFIX):
        raise RuntimeError(f"QwenImagePipeline's prompt template changed: {template!r}")
    count = len(pipe.tokenizer(PROMPT_PREFIX).input_ids)
    if count != drop:
        raise RuntimeError(
            f"the tiny tokenizer gives the system prefix {count} tokens, the pipeline drops {drop}"
        )
