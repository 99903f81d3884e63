"""FLUX.2 [klein] (4B and 9B; distilled and base): a rectified-flow MMDiT with shared modulations, a Qwen3
text encoder read at three depths, and the 32-channel FLUX.2 VAE whose latents are normalised per 2x2 patch.

As `Flux2KleinPipeline` runs it: a caption goes through Qwen3's chat template (no thinking), padded to 512
tokens; the hidden states after layers 9, 18 and 27 are stacked per token (3 x the encoder's width) and the
transformer sees all 512 positions, padding included (the attention mask reaches only the encoder). The VAE's
latents are patchified 2x2 (32 -> 128 channels) and normalised with the VAE's batch-norm running statistics;
the transformer takes them packed as tokens with (t, h, w, l) position ids, and t in [0, 1]. It has no
guidance embedding: the base variant's classifier-free guidance is two passes, the distilled one skips it.

The objective sees the normalised latents unpatchified again, `[N, 32, H/8, W/8]`: the normalisation is per
element, the patchify a fixed permutation of the elements, so noise, interpolation and the velocity
target are the same numbers in either layout, and the flow sampling counts (H/16)(W/16) image tokens, the
transformer's. `predict` patchifies and packs, the transformer's output is unpacked and unpatchified.
Only the transformer trains: the LLM text encoder never does (diffusers' klein script and musubi-tuner
train the transformer alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from loraflow_shared.families import facts_named

from loraflow_diffusion.families.base import (
    MIB,
    Conditioning,
    ExportFacts,
    FlowMatchingObjective,
    Footprint,
    ModelFamily,
    T,
    TextEmbeddings,
)
from loraflow_diffusion.families.flux2_names import flux2_kohya_names

# `Flux2KleinPipeline.encode_prompt`'s defaults (and musubi-tuner's `OUTPUT_LAYERS_QWEN3`, `MAX_LENGTH`).
# diffusers' train_dreambooth_lora_flux2_klein.py defaults to layers (10, 20, 30), which neither its pipeline
# nor musubi-tuner use: a LoRA trained on those would be conditioned differently at inference.
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 512
# musubi-tuner's recommended `--timestep_sampling flux2_shift` (docs/flux_2.md): a sigmoid draw shifted by
# FLUX's resolution rule over the packed image tokens, which is this objective's "flux_shift" (mu from 0.5
# at 256 tokens to 1.15 at 4096). diffusers' klein script samples t uniformly ("none" weighting).
FLUX2_KLEIN_OBJECTIVE = FlowMatchingObjective(timestep_sampling="flux_shift")
# The transformer's width names the size, as musubi-tuner's `FLUX2_MODEL_INFO` (Klein4BParams: 3072, 9B:
# 4096); a test model of another width is named as the 4B.
_WIDTH_9B = 4096

# Parameters: the published FLUX.2-klein-4B configs built on the meta device and counted: transformer
# (diffusers' scripts/convert_flux2_to_diffusers.py "klein-4b": 5 double, 20 single blocks, width 3072) 3.88B,
# Qwen3-4B (musubi-tuner's QWEN3_4B_CONFIG_JSON, Qwen3ForCausalLM, tied embeddings) 4.02B, AutoencoderKLFlux2
# (its defaults, as the conversion script builds it) 84.0M; LoRA parameters per rank: Σ (in + out) of the 60
# Linear layers diffusers' default targets reach. The 9B: transformer 9.08B, Qwen3-8B 8.19B, 1.74M per rank.
# Activations: NOT measured (no GPU here): FLUX.1's estimate (flux.py) scaled by the number of blocks of the
# same width, 25 of 57 (4096 image + 512 text tokens at 1024², as FLUX.1's); the VAE is FLUX.1's shape.
FLUX2_KLEIN_4B_FOOTPRINT = Footprint(
    denoiser_params=3_875_544_576,
    text_encoder_params=4_022_468_096,
    vae_params=84_046_115,
    denoiser_lora_params_per_rank=1_044_480,
    text_encoder_lora_params_per_rank=0,  # never trained
    vae_upcast=False,
    reference_side=1024,
    denoiser_activation_bytes=9_216 * MIB,
    denoiser_checkpointed_activation_bytes=1_024 * MIB,
    text_encoder_activation_bytes=0,
    vae_encode_bytes=1_280 * MIB,
)


class Flux2Klein(ModelFamily):
    facts = facts_named("flux2_klein")  # name, pipeline classes, compute: loraflow_shared.families
    description = "a FLUX.2 [klein] model"  # as Black Forest Labs writes it
    pipeline_class = Flux2KleinPipeline
    # diffusers' single_file_utils CHECKPOINT_KEY_NAMES["flux2"]: the shared single-stream modulation, which
    # FLUX.1 (per-block modulations) has not. (FLUX.2 [dev] files have it too; neither loads from one file.)
    single_file_marker_key = "single_stream_modulation.lin.weight"
    denoiser_name = "transformer"
    pixel_multiple = 16  # VAE factor 8 x 2x2 patches
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    trainable_text_encoder_names = ()
    # diffusers' train_dreambooth_lora_flux2_klein.py without `--lora_layers`: the double blocks' image-stream
    # attention (peft matches suffixes: `to_out.0` is the double blocks' output projection) and the single
    # blocks' fused QKV+MLP input and output, named per block (up to the 9B's 24).
    denoiser_target_modules = (
        "to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
        *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)),
    )  # fmt: skip
    objective = FLUX2_KLEIN_OBJECTIVE
    footprint = FLUX2_KLEIN_4B_FOOTPRINT
    # clip_skip is SD 1.x's; Min-SNR weights a DDPM loss; the T5 limit is FLUX.1's; no klein embeds guidance.
    ignored_config_keys = frozenset(
        {"clip_skip", "min_snr_gamma", "t5xxl_max_token_length", "apply_t5_attn_mask", "guidance_scale"}
    )

    def tokenize(self, pipe: DiffusionPipeline, prompts: Sequence[str]) -> list[torch.Tensor]:
        """[token ids, attention mask], each `[N, 512]`: each prompt as the user turn of Qwen3's chat
        template with the assistant's turn opened and thinking off, as `encode_prompt` tokenizes it."""
        tokenizer = pipe.tokenizer
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
            for prompt in prompts
        ]
        tokens = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=MAX_SEQUENCE_LENGTH,
            return_tensors="pt",
        )
        return [tokens.input_ids, tokens.attention_mask]

    def encode_tokens(
        self,
        text_encoders: Sequence[torch.nn.Module],
        token_ids: Sequence[torch.Tensor],
        clip_skip: int | None = None,
    ) -> TextEmbeddings:
        """Qwen3's hidden states after layers 9, 18 and 27, concatenated per token: `[N, 512, 3 * width]`."""
        (encoder,), (ids, mask) = text_encoders, token_ids
        output = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        stacked = torch.stack([output.hidden_states[layer] for layer in TEXT_ENCODER_OUT_LAYERS], dim=1)
        batch, layers, length, width = stacked.shape
        return TextEmbeddings(stacked.permute(0, 2, 1, 3).reshape(batch, length, layers * width))

    def encode_latents(
        self, pipe: DiffusionPipeline, pixels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """uint8 `[N,3,H,W]` to the normalised latents `[N, 32, H/8, W/8]` (fp32): the posterior's mean, as
        BFL's `AutoEncoder.encode`, diffusers' klein script and musubi-tuner take it (`generator` is not
        drawn from), patchified, normalised by the VAE's batch-norm statistics, unpatchified."""
        vae = pipe.vae
        images = (pixels.float() / 127.5 - 1.0).to(vae.device, vae.dtype)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mode().float()
        _require_even(latents)
        patches = Flux2KleinPipeline._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches)
        return cast(torch.Tensor, Flux2KleinPipeline._unpatchify_latents((patches - mean) / std))

    def predict(
        self,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity for `[N, 32, h, w]` latents, as the pipeline's denoising step calls it
        (no guidance embedding: `guidance` does not apply)."""
        _require_even(noisy_latents)
        height, width = noisy_latents.shape[-2:]
        dtype = cast(torch.dtype, denoiser.dtype)
        device = noisy_latents.device
        patches = Flux2KleinPipeline._patchify_latents(noisy_latents.to(dtype))
        image_ids = Flux2KleinPipeline._prepare_latent_ids(patches).to(device)
        packed = Flux2KleinPipeline._pack_latents(patches)
        text = cond.encoder_hidden_states.to(dtype)
        output = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(dtype),
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(text).to(device),
            img_ids=image_ids,
            return_dict=False,
        )[0][:, : packed.shape[1]]
        unpacked = Flux2KleinPipeline._unpack_latents_with_ids(output, image_ids, height // 2, width // 2)
        return cast(torch.Tensor, Flux2KleinPipeline._unpatchify_latents(unpacked))

    def kohya_names(self, pipe: DiffusionPipeline, state_dict: Mapping[str, T]) -> dict[str, T]:
        """BFL names (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`), which
        ComfyUI maps, musubi-tuner writes and diffusers' FLUX.2 kohya reader reads; q/k/v fused exactly."""
        tensors = cast(Mapping[str, torch.Tensor], state_dict)
        return cast(dict[str, T], flux2_kohya_names(tensors, pipe.transformer.config))

    def export_facts(self, pipe: DiffusionPipeline) -> ExportFacts:
        """musubi-tuner's names (utils/sai_model_spec.py, dataset/architectures.py): `ss_base_model_version`
        "flux_2_klein_4b"/"flux_2_klein_9b", `modelspec.architecture` "Flux.2-klein-4b"/"-9b", base and
        distilled alike. (ai-toolkit writes "flux2_klein_4b" as the base model version.)"""
        config = pipe.transformer.config
        size = "9b" if config.num_attention_heads * config.attention_head_dim >= _WIDTH_9B else "4b"
        return ExportFacts(
            base_model_version=f"flux_2_klein_{size}",
            architecture=f"Flux.2-klein-{size}",
            implementation="https://github.com/black-forest-labs/flux2",
            sd_v2=False,
            v_parameterization=False,
        )


def _require_even(latents: torch.Tensor) -> None:
    """The 2x2 patches need even latent sides: image sides that are multiples of 16."""
    height, width = latents.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(
            f"FLUX.2 [klein] needs image sides that are multiples of 16; the latents are {width}x{height}"
        )
