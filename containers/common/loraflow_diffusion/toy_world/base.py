"""The toy world's base model: an SD 1.5-shaped pipeline (VAE, UNet, CLIP text encoder) small enough to
train LoRAs and render previews in seconds on 2 CPU cores, fitted to the toy world by `toy_world.fit` and
committed as fp16 safetensors in `weights/` (README.md beside this file: its settings and quality).

`untrained_pipeline` is the builder: the committed weights must load into exactly its configuration.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Imported from their modules, not `diffusers`: its lazy top level types every name as a dummy for mypy.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from transformers import CLIPTextModel

from loraflow_diffusion.tiny import clip_text_config, tiny_clip_tokenizer
from loraflow_diffusion.toy_world.world import SIZE, VOCABULARY

TOY_BASE_NAME = "toy-world"  # its name under base-models/ in the local cloud
WEIGHTS_DIR = Path(__file__).parent / "weights"
TEXT_WIDTH = 64
LATENT_SIDE = SIZE // 4  # the VAE downsamples by 4: 64 px -> 16x16 latents


def untrained_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The base's architecture with fresh weights (same seed, same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer(VOCABULARY)
        return StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(clip_text_config(len(tokenizer), TEXT_WIDTH, intermediate_size=128)),
            tokenizer=tokenizer,
            unet=_unet(),
            # SD 1.5's noise schedule rescaled to zero terminal SNR, v-prediction, sampled from the last
            # timestep (Lin et al. 2024; `fit.ZERO_SNR_STAGE` says why); DPM-Solver++ renders in 20 steps.
            scheduler=DPMSolverMultistepScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                prediction_type="v_prediction",
                rescale_betas_zero_snr=True,
                timestep_spacing="trailing",
                steps_offset=1,  # unused by trailing spacing; diffusers warns without it
            ),
            # diffusers annotates these two as required, yet documents and accepts None.
            safety_checker=None,  # type: ignore[arg-type]
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )


def load_toy_base(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The committed, fitted base."""
    return StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR, dtype=dtype)


def copy_toy_base(path: Path) -> Path:
    """Copy the committed base to `path` (a diffusers folder) and return `path`."""
    shutil.copytree(WEIGHTS_DIR, path, dirs_exist_ok=True)
    return path


def _vae() -> AutoencoderKL:
    # Three blocks: downsampling by 4, so a 64 px scene keeps its shapes' corners in 16x16 latents.
    return AutoencoderKL(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=False,
    )


def _unet() -> UNet2DConditionModel:
    # Cross-attention at 8x8 and 4x4 (a shape is 2-3 latent px across at 8x8), none at 16x16: attention
    # there tripled the step time on CPU (1.5 s against 0.52 s a batch of 64). A fourth level down to 2x2
    # (quadrants that zero padding tells apart) did not teach it positions either (README.md).
    return UNet2DConditionModel(
        sample_size=LATENT_SIDE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )
