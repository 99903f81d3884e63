"""Z-Image (Turbo and Base): a single-stream rectified-flow DiT on FLUX's 16-channel VAE latents, conditioned
on a Qwen3-4B text encoder's second-to-last hidden state; no pooled text, no guidance embedding.

As `ZImagePipeline` calls it and diffusers' `train_dreambooth_lora_z_image.py` and musubi-tuner's
`zimage_train_network.py` train it: each caption is wrapped in Qwen3's chat template, padded to 512 tokens
and encoded with its attention mask; the transformer takes each sample's unpadded caption tokens and its
latents as a list of one-frame `[C, 1, H, W]` tensors (it patchifies them itself), the time as 1 - t, and
predicts minus the velocity. `predict` undoes both conventions, so the objective sees `[N, 16, H/8, W/8]`,
t in [0, 1] and the velocity noise - x like every other family. The LoRA trains the transformer only (the LLM
never, as in both trainers); the two variants share every config but the scheduler's shift, so one
specification serves both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
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
from loraflow_diffusion.families.z_image_names import z_image_kohya_names

# musubi-tuner's recommended Z-Image LoRA settings (docs/zimage.md): `--timestep_sampling shift
# --weighting_scheme none --discrete_flow_shift 2.0` (sd-scripts' sigmoid draw, then shifted). diffusers'
# script draws t uniformly and shifts it by the scheduler's shift (3 Turbo, 6 Base); musubi's is the
# kohya-style choice this trainer's config keys name.
Z_IMAGE_OBJECTIVE = FlowMatchingObjective(timestep_sampling="shift", discrete_flow_shift=2.0)
MAX_TOKENS = 512  # `ZImagePipeline`'s `max_sequence_length`, diffusers' and musubi-tuner's training default
MASK = "attention_mask"  # the caption tokens the transformer sees, in `TextEmbeddings.extras`

# Parameters: Tongyi-MAI/Z-Image-Turbo's published configs (Z-Image Base has the same), built with diffusers
# 0.42.1 and transformers on the meta device and counted: transformer/config.json (dim 3840, 30 layers, 2 + 2
# refiner layers, 30 heads, cap_feat_dim 2560; quoted in test_z_image_lora_names.py) 6.155B; text_encoder/
# config.json (Qwen3-4B: 36 layers, hidden 2560, 8 KV heads, vocab 151936, tied embeddings, loaded as
# `Qwen3Model`) 4.022B; vae/config.json (FLUX.1's) 83.8M. LoRA parameters per rank: Σ (in + out) of the 136
# targeted Linear layers (to_q/k/v/out of the 30 layers and 2 + 2 refiners, 3840 wide).
#
# Activations: NOT measured (no GPU here); an estimate scaled from FLUX.1's (itself scaled from SDXL's
# per-token measurement): 32 blocks see the ~4096 image tokens at 1024² (30 joint layers, 2 noise refiners)
# against FLUX's 57, each 3840 wide with a SwiGLU of 10240 (about 1.1x a FLUX block's activations per token),
# so ~0.62x FLUX's 20 GiB, rounded up to 15 GiB. Checkpointed: the 34 blocks' inputs (~35 MiB each at 4096 +
# 512 tokens, bf16) plus one block recomputed, rounded up. Deliberately high, so the plan errs towards saving
# memory. The VAE is FLUX.1's (FLUX's encode cost); its config forces fp32.
Z_IMAGE_FOOTPRINT = Footprint(
    denoiser_params=6_154_908_736,
    text_encoder_params=4_022_468_096,
    vae_params=83_819_683,
    denoiser_lora_params_per_rank=1_044_480,
    text_encoder_lora_params_per_rank=0,
    vae_upcast=True,
    reference_side=1024,
    denoiser_activation_bytes=15_360 * MIB,
    denoiser_checkpointed_activation_bytes=1_792 * MIB,
    text_encoder_activation_bytes=0,
    vae_encode_bytes=1_280 * MIB,
)


TURBO_SHIFT = 3.0  # Z-Image-Turbo's scheduler shift; Z-Image (base) has 6.0


class ZImage(ModelFamily):
    facts = facts_named("z_image")  # name, pipeline classes, compute: loraflow_shared.families
    pipeline_class = ZImagePipeline
    # diffusers' single_file_utils CHECKPOINT_KEY_NAMES["z-image-turbo"] (the original and ComfyUI layout; the
    # key is the same in diffusers' transformer files).
    single_file_marker_key = "layers.0.adaLN_modulation.0.weight"
    denoiser_name = "transformer"
    pixel_multiple = 16  # VAE factor 8 x 2x2 patches
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    trainable_text_encoder_names = ()  # Qwen3-4B is never trained (diffusers' script, musubi-tuner)
    # diffusers' train_dreambooth_lora_z_image.py default (no `--lora_layers`): every attention projection, of
    # the 30 joint layers and of both refiners (peft matches the names as suffixes).
    denoiser_target_modules = ("to_k", "to_q", "to_v", "to_out.0")
    objective = Z_IMAGE_OBJECTIVE
    footprint = Z_IMAGE_FOOTPRINT
    # clip_skip is SD 1.x's; Min-SNR weights a DDPM loss; the transformer embeds no guidance; no T5 here.
    ignored_config_keys = frozenset(
        {"clip_skip", "min_snr_gamma", "guidance_scale", "t5xxl_max_token_length", "apply_t5_attn_mask"}
    )

    def tokenize(self, pipe: DiffusionPipeline, prompts: Sequence[str]) -> list[torch.Tensor]:
        """`[ids, attention_mask]`, both `[N, 512]`: each prompt in Qwen3's chat template (thinking enabled),
        padded and truncated as `ZImagePipeline._encode_prompt` does."""
        tokenizer = pipe.tokenizer
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for prompt in prompts
        ]
        tokens = tokenizer(
            texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        )
        return [tokens.input_ids, tokens.attention_mask]

    def encode_tokens(
        self,
        text_encoders: Sequence[torch.nn.Module],
        token_ids: Sequence[torch.Tensor],
        clip_skip: int | None = None,
    ) -> TextEmbeddings:
        """The second-to-last hidden state, with the mask of the tokens the pipeline keeps. Trailing columns
        that are padding in every caption are not run (the causal encoder's other outputs do not depend on
        them; one host sync finds them) and come back as zeros: every batch keeps the tokenizer's length."""
        (encoder,), (ids, mask) = text_encoders, token_ids
        keep = mask.bool()
        used = int(keep.any(dim=0).nonzero().max()) + 1
        hidden = encoder(
            input_ids=ids[:, :used], attention_mask=keep[:, :used], output_hidden_states=True
        ).hidden_states[-2]
        padded = torch.nn.functional.pad(hidden, (0, 0, 0, ids.shape[1] - used))
        return TextEmbeddings(padded, extras={MASK: keep})

    def conditioning(self, text: TextEmbeddings, size: Size) -> Conditioning:
        return Conditioning(text.hidden_states, {MASK: text.extras[MASK]})

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """The transformer as `ZImagePipeline` calls it: one-frame latents and unpadded captions as lists,
        time 1 - t; its output negated (Z-Image predicts x - noise) and stacked back to `[N, C, H, W]`."""
        dtype = cast(torch.dtype, denoiser.dtype)
        images = list(noisy_latents.to(dtype).unsqueeze(2).unbind(dim=0))
        hidden = cond.encoder_hidden_states.to(dtype)
        keep = cond.added_cond_kwargs[MASK].bool()
        captions = [states[mask] for states, mask in zip(hidden, keep, strict=True)]
        output = denoiser(images, 1.0 - timesteps.float(), captions, return_dict=False)[0]
        return -torch.stack(output).squeeze(2)

    def preview_arguments(self, pipe: DiffusionPipeline) -> dict[str, Any]:
        """Turbo is guidance-distilled: sampled without classifier-free guidance (its model card and
        diffusers' example use guidance_scale 0), where the pipeline's default (5.0) would double the cost
        and burn the image. Base keeps the default. They differ only in the scheduler's shift."""
        return {"guidance_scale": 0.0} if pipe.scheduler.config.shift <= TURBO_SHIFT else {}

    def kohya_names(self, pipe: DiffusionPipeline, state_dict: Mapping[str, T]) -> dict[str, T]:
        """ComfyUI's names (`lora_unet_layers_0_attention_qkv`, `…_attention_out`), as musubi-tuner's
        `convert_z_image_lora_to_comfy.py` writes them: q/k/v fused exactly into ComfyUI's `qkv`."""
        tensors = cast(Mapping[str, torch.Tensor], state_dict)
        return cast(dict[str, T], z_image_kohya_names(tensors, pipe.transformer.config))

    def export_facts(self, pipe: DiffusionPipeline) -> ExportFacts:
        """As musubi-tuner writes a Z-Image LoRA's metadata (utils/sai_model_spec.py,
        dataset/architectures.py): `ss_base_model_version` "z_image", `modelspec.architecture`
        "Z-Image/lora", Tongyi-MAI's repository."""
        return ExportFacts(
            base_model_version="z_image",
            architecture="Z-Image",
            implementation="https://github.com/Tongyi-MAI/Z-Image",
            sd_v2=False,
            v_parameterization=False,
        )
