"""Qwen-Image: a 60-block dual-stream MMDiT (20B) on 2x2-packed 16-channel latents of a Wan-style causal 3D
VAE, conditioned on the last hidden state of Qwen2.5-VL-7B (an LLM: never trained here).

As `QwenImagePipeline` renders it and diffusers' `train_dreambooth_lora_qwen_image.py` trains it:
- captions are wrapped in the pipeline's chat template, whose system prompt (34 tokens) is encoded and then
  dropped; each caption keeps its own tokens (at most 512), zero-padded under a mask
  (`encoder_hidden_states_mask`) that the transformer's joint attention honours; the transformer sees them
  padded to the batch's longest caption, as the pipeline pads them;
- images get a frame axis for the VAE (one frame) and are normalised per channel by the VAE config's
  `latents_mean`/`latents_std` (the pipeline decodes `x * std + mean`);
- the transformer takes the latents packed into 2x2 patches with their image shape (`img_shapes`, for its
  3D RoPE), and t in [0, 1] (the pipeline passes its scheduler timestep / 1000, i.e. sigma); its output is
  the velocity noise - x, unpacked here so the objective sees `[N, 16, H/8, W/8]` like every other family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
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

# musubi-tuner's Qwen-Image LoRA recipe (docs/qwen_image.md, "Standard Qwen-Image Training"):
# `--timestep_sampling shift --discrete_flow_shift 2.2 --weighting_scheme none`; its "shift" is sd-scripts'
# (sigmoid of a normal draw, then shifted), as `flow.FlowSampling` draws it. The transformer takes t itself.
QWEN_IMAGE_OBJECTIVE = FlowMatchingObjective(timestep_sampling="shift", discrete_flow_shift=2.2)

# The pipeline's render default (`__call__(max_sequence_length=512)`, also the training script's default):
# the prompt's tokens after the system prompt, at most. The encoder is causal, so tokenizing only that far
# gives the tokens kept exactly the hidden states of the pipeline's longer encoding.
MAX_TEXT_TOKENS = 512
PROMPT_DROP = 34  # `QwenImagePipeline.prompt_template_encode_start_idx`: the system prompt's tokens
MASK = "encoder_hidden_states_mask"  # the transformer's argument, and the conditioning's key for it
VAE_FACTOR = 8  # 2 ** len(temperal_downsample): the pipeline's `vae_scale_factor`

# Parameters: the published Qwen/Qwen-Image configs built on the meta device (diffusers 0.42.1, transformers
# 5.23) and counted: transformer/ (60 layers, 24 heads x 128, joint_attention_dim 3584) 20.43B; text_encoder/
# (Qwen2.5-VL-7B-Instruct's: 28 layers of 3584, vocab 152064, untied lm_head, 32-block vision tower: the whole
# model is loaded) 8.29B; vae/ (base_dim 96, dim_mult 1-2-4-4, 2 res blocks) 126.9M. Configs as quoted in
# aigc-apps/VideoX-Fun comfyui/qwenimage/nodes.py; the transformer's and VAE's are diffusers' defaults.
# LoRA parameters per rank: Σ (in + out) of the 240 targeted Linear layers (60 x to_q/k/v/out.0, 3072 wide).
# The text encoder is never trained: no LoRA parameters, no training activations.
# Activations: NOT measured (no GPU here); a deliberately high estimate, FLUX.1's estimate (itself scaled from
# SDXL's per-token measurement) times 1.58: 60 dual-stream blocks are ~120 single-stream block equivalents
# against FLUX.1's 19 x 2 + 38 = 76, at the same width (3072) and 4096 image tokens at 1024²; the shorter
# text sequence (a caption's own tokens vs T5's 512) is not credited. VAE encoding: FLUX.1's figure (this
# encoder is narrower, 96-384 channels against 128-512), so it errs high too.
QWEN_IMAGE_FOOTPRINT = Footprint(
    denoiser_params=20_430_401_088,
    text_encoder_params=8_292_166_656,
    vae_params=126_892_531,
    denoiser_lora_params_per_rank=1_474_560,
    text_encoder_lora_params_per_rank=0,
    vae_upcast=False,
    reference_side=1024,
    denoiser_activation_bytes=32_400 * MIB,
    denoiser_checkpointed_activation_bytes=3_640 * MIB,
    text_encoder_activation_bytes=0,
    vae_encode_bytes=1_280 * MIB,
)

# How the trainer's kohya dict names the transformer (diffusers' converter: the component name) and how
# musubi-tuner (networks/lora_qwen_image.py, prefix "lora_unet") names it; ComfyUI maps `lora_unet_` + its
# model's own module path, which is diffusers' (comfy/lora.py `model_lora_keys_unet`, comfy/ldm/qwen_image).
_CONVERTER_PREFIX = "transformer_"
KOHYA_PREFIX = "lora_unet_"


class QwenImage(ModelFamily):
    facts = facts_named("qwen_image")  # name, pipeline classes, compute: loraflow_shared.families
    pipeline_class = QwenImagePipeline
    # diffusers 0.42.1's `CHECKPOINT_KEY_NAMES` has no Qwen-Image entry (its single-file mapping for
    # QwenImageTransformer2DModel is the identity: the original files hold diffusers' names); ComfyUI
    # recognises the transformer by this key (comfy/model_detection.py, "Qwen Image").
    single_file_marker_key = "txt_norm.weight"
    denoiser_name = "transformer"
    pixel_multiple = 16  # VAE factor 8 x 2x2 patches
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    trainable_text_encoder_names = ()  # Qwen2.5-VL is frozen in diffusers' script and musubi-tuner alike
    # diffusers' train_dreambooth_lora_qwen_image.py default (no `--lora_layers`): the image stream's
    # attention projections (peft matches suffixes: `add_q_proj` and `to_add_out` are not among them).
    denoiser_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    objective = QWEN_IMAGE_OBJECTIVE
    footprint = QWEN_IMAGE_FOOTPRINT
    # clip_skip is SD 1.x's; Min-SNR weights an epsilon/v loss by the DDPM schedule's SNR; T5's limit is
    # FLUX's; the transformer embeds no guidance (`guidance_embeds` false: the pipeline ignores the scale).
    ignored_config_keys = frozenset(
        {"clip_skip", "min_snr_gamma", "t5xxl_max_token_length", "apply_t5_attn_mask", "guidance_scale"}
    )

    def latent_channels(self, pipe: DiffusionPipeline) -> int:
        return int(pipe.transformer.config.in_channels) // 4  # as the pipeline: packed 2x2 patches

    # -- text --------------------------------------------------------------------------------------

    def tokenize(self, pipe: DiffusionPipeline, prompts: Sequence[str]) -> list[torch.Tensor]:
        """The pipeline's chat template around each prompt, tokenized as `_get_qwen_prompt_embeds` does
        (padded to the longest): `[input_ids, attention_mask]`, both `[N, L]`."""
        if pipe.prompt_template_encode_start_idx != PROMPT_DROP:
            raise ValueError(
                f"QwenImagePipeline drops {pipe.prompt_template_encode_start_idx} template tokens,"
                f" this family {PROMPT_DROP}"
            )
        tokens = pipe.tokenizer(
            [pipe.prompt_template_encode.format(prompt) for prompt in prompts],
            max_length=PROMPT_DROP + MAX_TEXT_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        return [tokens.input_ids, tokens.attention_mask]

    def encode_tokens(
        self,
        text_encoders: Sequence[torch.nn.Module],
        token_ids: Sequence[torch.Tensor],
        clip_skip: int | None = None,
    ) -> TextEmbeddings:
        """Qwen2.5-VL's last hidden state (its language model's: the logits are never needed), each caption's
        own tokens after the system prompt, as `_get_qwen_prompt_embeds` keeps them; `extras[MASK]` marks
        them. Every batch comes back `MAX_TEXT_TOKENS` long, zero-padded, so batches encoded apart stack
        (cached embeddings); `predict` cuts the padding off again."""
        (encoder,), (ids, attention_mask) = text_encoders, token_ids
        language = cast(Any, encoder).model  # Qwen2_5_VLModel: what the pipeline's hidden_states[-1] is of
        hidden = language(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        kept = [states[row.bool()][PROMPT_DROP:] for states, row in zip(hidden, attention_mask, strict=True)]
        embeddings = hidden.new_zeros((len(kept), MAX_TEXT_TOKENS, hidden.shape[-1]))
        mask = torch.zeros((len(kept), MAX_TEXT_TOKENS), dtype=torch.long, device=hidden.device)
        for index, states in enumerate(kept):
            embeddings[index, : len(states)] = states
            mask[index, : len(states)] = 1
        return TextEmbeddings(embeddings, extras={MASK: mask})

    def conditioning(self, text: TextEmbeddings, size: Size) -> Conditioning:
        return Conditioning(text.hidden_states, {MASK: text.extras[MASK]})

    # -- images ------------------------------------------------------------------------------------

    def encode_latents(
        self, pipe: DiffusionPipeline, pixels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """One-frame videos to the VAE, a posterior sample, `(x - latents_mean) / latents_std` per channel
        (the pipeline decodes `x * std + mean`), the frame axis dropped: `[N, 16, H/8, W/8]` (fp32)."""
        vae = pipe.vae
        videos = (pixels.float() / 127.5 - 1.0).to(vae.device, vae.dtype)[:, :, None]
        with torch.no_grad():
            latents = vae.encode(videos).latent_dist.sample(generator=generator).float()[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1)
        return (latents - mean) / std

    # -- the denoiser ------------------------------------------------------------------------------

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """The pipeline's transformer call; the text is cut to the batch's longest caption (the rest is
        masked padding, as the pipeline pads) and an all-true mask is passed as None, as the pipeline does."""
        batch, channels, height, width = noisy_latents.shape
        dtype = cast(torch.dtype, denoiser.dtype)
        packed = QwenImagePipeline._pack_latents(noisy_latents.to(dtype), batch, channels, height, width)
        text, mask = _trimmed(cond.encoder_hidden_states, cond.added_cond_kwargs[MASK])
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(dtype),
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=text.to(dtype),
            img_shapes=[[(1, height // 2, width // 2)]] * batch,
            return_dict=False,
        )[0]
        # `_unpack_latents` takes the image size in pixels and gives `[N, C, 1, h, w]` (one frame).
        unpacked = QwenImagePipeline._unpack_latents(
            output, height * VAE_FACTOR, width * VAE_FACTOR, VAE_FACTOR
        )
        return cast(torch.Tensor, unpacked[:, :, 0])

    # -- export ------------------------------------------------------------------------------------

    def preview_arguments(self, pipe: DiffusionPipeline) -> dict[str, Any]:
        """Qwen-Image is not guidance-distilled: `QwenImagePipeline` applies its true CFG (default scale 4.0)
        only with a negative prompt, and renders washed-out images without; Qwen's own examples pass " "."""
        return {"negative_prompt": " "}

    # Its classifier-free guidance is `true_cfg_scale` (`guidance_scale` is for guidance-distilled weights).
    guidance_argument = "true_cfg_scale"

    def kohya_names(self, pipe: DiffusionPipeline, state_dict: Mapping[str, T]) -> dict[str, T]:
        """musubi-tuner's names (`lora_unet_transformer_blocks_0_attn_to_q`): the transformer's module paths
        under kohya's UNet prefix, which ComfyUI maps to its Qwen-Image model (same module paths as
        diffusers') and diffusers' `QwenImagePipeline.load_lora_weights` reads back. No module is fused."""
        modules = {  # every Linear, with a peft LoRA (its `base_layer`) or without; not peft's own parts
            name.replace(".", "_")
            for name, module in pipe.transformer.named_modules()
            if isinstance(getattr(module, "base_layer", module), torch.nn.Linear)
            and ".lora_" not in name
            and not name.endswith(".base_layer")
        }
        renamed: dict[str, T] = {}
        for key, value in state_dict.items():
            module, dot, suffix = key.partition(".")
            if not module.startswith(_CONVERTER_PREFIX) or module[len(_CONVERTER_PREFIX) :] not in modules:
                raise ValueError(f"{key}: not a LoRA module of the Qwen-Image transformer")
            renamed[KOHYA_PREFIX + module[len(_CONVERTER_PREFIX) :] + dot + suffix] = value
        return renamed

    def export_facts(self, pipe: DiffusionPipeline) -> ExportFacts:
        """As musubi-tuner writes them for a Qwen-Image LoRA: `ss_base_model_version` its architecture's full
        name (dataset/architectures.py), `modelspec.architecture`/`.implementation` from
        utils/sai_model_spec.py (`ARCH_QWEN_IMAGE`, `IMPL_QWEN_IMAGE`)."""
        return ExportFacts(
            base_model_version="qwen_image",
            architecture="Qwen-Image",
            implementation="https://github.com/QwenLM/Qwen-Image",
            sd_v2=False,
            v_parameterization=False,
        )


def _trimmed(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text and its mask cut to the longest caption's tokens (the mask's ones come first); None for an
    all-true mask, as `QwenImagePipeline.encode_prompt` returns it."""
    longest = int(mask.sum(dim=1).max())
    text, mask = text[:, :longest], mask[:, :longest]
    return (text, None) if bool(mask.all()) else (text, mask)
