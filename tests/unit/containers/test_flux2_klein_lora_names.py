"""FLUX.2's BFL names for the kohya file's transformer LoRA (`flux2_names`): every module lands on a weight
of the model ComfyUI holds for FLUX.2 [klein], the fused `img_attn.qkv`/`txt_attn.qkv` apply exactly what the
peft LoRA adds, and diffusers' own FLUX.2 kohya reader takes the file back apart.

Checked on FLUX.2-klein-4B's real transformer (built on the meta device from its published config; the LoRA's
own weights real, at full width) and on a small `Flux2Transformer2DModel` of ComfyUI's FLUX.2 shape (outputs).
ComfyUI's layout comes from a port of its model and key map (`comfy_flux2_klein`), itself checked against
diffusers' single-file converter, never from the code under test.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from comfy_flux2_klein import (
    COMFY,
    bfl_from_diffusers,
    comfyui_detect_flux2,
    comfyui_flux2_lora_key_map,
    comfyui_flux2_shapes,
)
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from lora_clients import comfyui_apply_lora
from lora_testing import forward, kohya_pair, linear_names, matching, peft_lora, randomize
from loraflow_diffusion.families import family_named
from loraflow_diffusion.families.flux2_names import flux2_bfl_modules, flux2_kohya_names
from loraflow_training.kohya import ComponentLora, to_kohya_state_dict
from peft import LoraConfig

pytestmark = pytest.mark.slow  # builds FLUX.2-klein's transformer (on the meta device) and runs a small one

# black-forest-labs/FLUX.2-klein-4B transformer/config.json, as diffusers'
# scripts/convert_flux2_to_diffusers.py "klein-4b" writes it (its "klein-9b": 8 double, 24 single blocks,
# 32 heads, joint_attention_dim 12288).
KLEIN_4B_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}
KLEIN_9B_CONFIG = {
    **KLEIN_4B_CONFIG,
    "num_layers": 8,
    "num_single_layers": 24,
    "num_attention_heads": 32,
    "joint_attention_dim": 12288,
}
# ComfyUI's FLUX.2 shape (head dim 128, 256 timestep channels, 128 latent channels), two heads wide.
SMALL_CONFIG = {**KLEIN_4B_CONFIG, "num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2}
SMALL_CONFIG["joint_attention_dim"] = 64
FLUX2_KLEIN = family_named("flux2_klein")
DEFAULT_TARGETS = FLUX2_KLEIN.denoiser_target_modules
# Every Linear, ranks and scales (alpha / rank) differing inside the fused q/k/v: to_q 4.0, to_k 0.5 (rank 5),
# add_v_proj 6.0 (rank 1), the rest 2.0 (rank 3, alpha 6).
MIXED_RANKS = {r"attn\.to_q": 2, r"attn\.to_k": 5, r"attn\.add_v_proj": 1}
MIXED_ALPHAS = {r"attn\.to_q": 8.0, r"attn\.to_k": 2.5}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def klein_4b() -> Flux2Transformer2DModel:
    with torch.device("meta"):
        return Flux2Transformer2DModel.from_config(KLEIN_4B_CONFIG)


@pytest.fixture(scope="module")
def small_base() -> Flux2Transformer2DModel:
    """A small FLUX.2 transformer, every weight random (seeded), no LoRA."""
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel.from_config(SMALL_CONFIG).eval()
    randomize(transformer.parameters(), seed=1, std=0.05)
    return transformer


@pytest.fixture(scope="module")
def small_inputs() -> dict[str, torch.Tensor]:
    """A 4x4-token image (packed patchified latents) and 8 text tokens, fixed."""
    generator = torch.Generator().manual_seed(2)
    patches = torch.randn(1, SMALL_CONFIG["in_channels"], 4, 4, generator=generator)
    text = torch.randn(1, 8, SMALL_CONFIG["joint_attention_dim"], generator=generator)
    return {
        "hidden_states": Flux2KleinPipeline._pack_latents(patches),
        "encoder_hidden_states": text,
        "timestep": torch.tensor([0.7]),
        "img_ids": Flux2KleinPipeline._prepare_latent_ids(patches),
        "txt_ids": Flux2KleinPipeline._prepare_text_ids(text),
    }


# -- FLUX.2-klein-4B: names and shapes as ComfyUI holds them ----------------------------------------------


@pytest.mark.parametrize(
    "config", [KLEIN_4B_CONFIG, KLEIN_9B_CONFIG, SMALL_CONFIG], ids=["4b", "9b", "small"]
)
def test_given_comfyui_flux2_layout_when_diffusers_converts_it_back_then_every_transformer_weight_returns(
    config: dict[str, Any],
) -> None:
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel.from_config(config)
    diffusers_shapes = {key: tuple(value.shape) for key, value in transformer.state_dict().items()}
    detected = comfyui_detect_flux2(
        {key: tuple(v.shape) for key, v in bfl_from_diffusers(transformer.state_dict()).items()}
    )
    comfy = {key: torch.empty(shape, device="meta") for key, shape in comfyui_flux2_shapes(detected).items()}

    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(comfy))

    assert {key: tuple(value.shape) for key, value in back.items()} == diffusers_shapes
    assert detected.num_heads == config["num_attention_heads"]


def test_given_a_small_transformer_in_bfl_layout_when_diffusers_converts_it_back_then_every_value_returns(
    small_base: Flux2Transformer2DModel,
) -> None:
    state = small_base.state_dict()

    back = convert_flux2_transformer_checkpoint_to_diffusers(bfl_from_diffusers(state))

    assert set(back) == set(state)
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_given_klein_4b_with_diffusers_default_targets_when_named_for_kohya_then_comfyui_maps_every_module(
    klein_4b: Flux2Transformer2DModel,
) -> None:
    state, alphas = _real_lora_on_meta(klein_4b, rank=4, alpha=8)
    pipe = cast(DiffusionPipeline, SimpleNamespace(transformer=klein_4b))

    converted = FLUX2_KLEIN.kohya_names(
        pipe, to_kohya_state_dict([ComponentLora("transformer", state, alphas)])
    )

    model = {COMFY + key: shape for key, shape in comfyui_flux2_shapes(_detected(klein_4b)).items()}
    key_map = comfyui_flux2_lora_key_map(model, KLEIN_4B_CONFIG)
    modules = {key.partition(".")[0] for key in converted}
    assert modules <= set(key_map)  # `comfyui_apply_lora` would load every key
    # 5 double blocks x (to_q, to_k, to_v, to_out.0) + 20 single blocks x (to_qkv_mlp_proj, to_out) ->
    # 5 x (img_attn.qkv, img_attn.proj) + 20 x (linear1, linear2).
    assert (len(alphas), len(modules)) == (60, 50)
    for module in modules:
        rows, columns = model[key_map[module].key]
        fused = module.endswith("_qkv")
        rank = 12 if fused else 4
        assert converted[f"{module}.lora_up.weight"].shape == (rows, rank)
        assert converted[f"{module}.lora_down.weight"].shape == (rank, columns)
        assert float(converted[f"{module}.alpha"]) == (24.0 if fused else 8.0)  # the scale stays 2
    # The names diffusers' converter gives reach nothing in ComfyUI's FLUX.2 model.
    assert not {f"lora_unet_{module.replace('.', '_')}" for module in alphas} & set(key_map)


def test_given_a_klein_4b_lora_when_diffusers_reads_its_kohya_file_then_each_modules_delta_is_kept(
    klein_4b: Flux2Transformer2DModel,
) -> None:
    state, alphas = _real_lora_on_meta(klein_4b, rank=3, alpha=2)
    kohya = flux2_kohya_names(
        to_kohya_state_dict([ComponentLora("transformer", state, alphas)]), KLEIN_4B_CONFIG
    )

    loaded: dict[str, torch.Tensor] = Flux2KleinPipeline.lora_state_dict(dict(kohya))

    modules = {
        key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in loaded if "lora_A" in key
    }
    assert modules == set(alphas)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for module in modules:  # each module's `delta @ probe`, in float64
        down, up = (loaded[f"transformer.{module}.lora_{ab}.weight"].double() for ab in "AB")
        probe = torch.randn(down.shape[1], 2, generator=generator, dtype=torch.float64) / down.shape[1] ** 0.5
        lora_down, lora_up = (state[f"{module}.lora_{ab}.weight"].double() for ab in "AB")
        expected = alphas[module] / lora_down.shape[0] * (lora_up @ (lora_down @ probe))
        worst = max(worst, float((up @ (down @ probe) - expected).abs().max()))
    assert worst < TOLERANCE


# -- exactness on a small transformer --------------------------------------------------------------------


@pytest.mark.parametrize("lora_shape", ["diffusers-default", "every-linear-mixed-scales"])
def test_given_a_small_flux2_lora_when_comfyui_merges_its_kohya_file_then_the_output_is_the_peft_loras(
    lora_shape: str, small_base: Flux2Transformer2DModel, small_inputs: dict[str, torch.Tensor]
) -> None:
    trained = _with_lora(small_base, lora_shape)
    state, alphas = peft_lora(trained)
    kohya = flux2_kohya_names(
        to_kohya_state_dict([ComponentLora("transformer", state, alphas)]), SMALL_CONFIG
    )

    bfl = {COMFY + key: value.clone() for key, value in bfl_from_diffusers(small_base.state_dict()).items()}
    not_loaded = comfyui_apply_lora(bfl, kohya, comfyui_flux2_lora_key_map(bfl, SMALL_CONFIG))
    merged = Flux2Transformer2DModel.from_config(SMALL_CONFIG).eval()
    merged.load_state_dict(
        convert_flux2_transformer_checkpoint_to_diffusers({k.removeprefix(COMFY): v for k, v in bfl.items()}),
        strict=True,
    )

    assert not_loaded == []
    expected = forward(trained, small_inputs)
    assert (expected - forward(small_base, small_inputs)).abs().max() > 0.05  # the LoRA matters
    assert (forward(merged, small_inputs) - expected).abs().max() < TOLERANCE


def test_given_a_small_flux2_lora_when_diffusers_loads_its_kohya_file_then_the_output_is_the_peft_loras(
    small_base: Flux2Transformer2DModel, small_inputs: dict[str, torch.Tensor]
) -> None:
    trained = _with_lora(small_base, "diffusers-default")
    state, alphas = peft_lora(trained)
    kohya = flux2_kohya_names(
        to_kohya_state_dict([ComponentLora("transformer", state, alphas)]), SMALL_CONFIG
    )

    loaded = copy.deepcopy(small_base)
    loaded.load_lora_adapter(Flux2KleinPipeline.lora_state_dict(dict(kohya)), prefix="transformer")

    assert (forward(loaded, small_inputs) - forward(trained, small_inputs)).abs().max() < TOLERANCE


def test_given_every_diffusers_linear_when_grouped_then_each_is_a_part_of_one_bfl_weight_comfyui_holds() -> (
    None
):
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel.from_config(KLEIN_4B_CONFIG)
    comfy = comfyui_flux2_shapes(_detected(transformer))

    modules = flux2_bfl_modules(KLEIN_4B_CONFIG)

    parts = [part for module in modules for part in module.parts]
    assert sorted(parts) == sorted(linear_names(transformer))  # each Linear once
    assert {f"{module.name}.weight" for module in modules} == {
        key for key in comfy if key.endswith(".weight")
    }


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "transformer_transformer_blocks_2_attn_to_q.lora_down.weight",
            "no ComfyUI/sd-scripts name",
        ),  # the config has 2 blocks
        (
            "transformer_single_transformer_blocks_0_proj_mlp.lora_down.weight",
            "no ComfyUI/sd-scripts name",
        ),  # FLUX.1's, not FLUX.2's
        ("transformer_transformer_blocks_0_attn_to_q.dora_scale", "not a plain LoRA"),
    ],
)
def test_given_a_module_or_key_with_no_flux2_counterpart_when_converted_then_it_is_refused(
    key: str, message: str
) -> None:
    kohya = kohya_pair("transformer_transformer_blocks_0_attn_to_q", 256, 256) | {key: torch.zeros(2, 256)}

    with pytest.raises(ValueError, match=message):
        flux2_kohya_names(kohya, SMALL_CONFIG)


def test_given_a_qkv_part_wider_than_the_config_says_when_converted_then_it_is_refused() -> None:
    with pytest.raises(ValueError, match="rows"):
        flux2_kohya_names(kohya_pair("transformer_transformer_blocks_0_attn_to_k", 256, 512), SMALL_CONFIG)


# -- helpers ----------------------------------------------------------------------------------------------


def _detected(transformer: Flux2Transformer2DModel) -> Any:
    shapes = {key: tuple(value.shape) for key, value in bfl_from_diffusers(transformer.state_dict()).items()}
    return comfyui_detect_flux2(shapes)


def _real_lora_on_meta(
    transformer: Flux2Transformer2DModel, rank: int, alpha: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The family's default targets on a copy of the meta-device `transformer`, the LoRA's weights real and
    random (a few MB even at full width)."""
    with_lora = copy.deepcopy(transformer)
    with torch.device("meta"):
        with_lora.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(DEFAULT_TARGETS)))
    shapes, alphas = peft_lora(with_lora)
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(value.shape, generator=generator) * 0.1 for key, value in shapes.items()}, alphas


def _with_lora(base: Flux2Transformer2DModel, lora_shape: str) -> Any:
    """A copy of `base` with a LoRA of that shape, its up and down weights random (a fresh up is zero)."""
    transformer = copy.deepcopy(base)
    if lora_shape == "diffusers-default":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS))
    else:
        names = linear_names(base)
        ranks, alphas = matching(MIXED_RANKS, names), matching(MIXED_ALPHAS, names)
        config = LoraConfig(r=3, lora_alpha=6, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas)
    transformer.add_adapter(config)
    randomize((p for n, p in transformer.named_parameters() if "lora_" in n), seed=3, std=0.1)
    return transformer
