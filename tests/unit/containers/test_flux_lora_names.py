"""sd-scripts' FLUX.1 names for the kohya file's transformer LoRA (`flux_names`): every module lands on a
Linear of Black Forest Labs' layout, which ComfyUI, Forge and sd-scripts hold, and the fused ones
(`img_attn.qkv`, `txt_attn.qkv`, `linear1`) apply exactly what the peft LoRA adds.

Checked on FLUX.1-dev's real transformer (built on the meta device from its config: names, shapes, and
diffusers' own kohya loader on real-width LoRA weights) and on a small `FluxTransformer2DModel` (outputs).
The BFL layout comes from a port of ComfyUI's own mapping (`lora_clients`), itself checked against
diffusers' single-file converter, never from the code under test.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from lora_clients import (
    ComfyFluxTarget,
    bfl_flux_to_diffusers,
    comfyui_apply_lora,
    comfyui_clip_l_lora_names,
    comfyui_convert_diffusers_flux,
    comfyui_flux_lora_key_map,
    comfyui_flux_to_diffusers,
)
from lora_testing import (
    delta,
    forward,
    kohya_modules,
    kohya_pair,
    linear_names,
    matching,
    peft_lora,
    random_lora,
    randomize,
    trainer_kohya,
)
from loraflow_diffusion.families.flux_names import (
    bfl_loras,
    bfl_modules,
    flux_kohya_names,
    kohya_flux_names,
)
from peft import LoraConfig

pytestmark = pytest.mark.slow  # builds FLUX.1-dev's transformer (on the meta device) and runs a small one

# black-forest-labs/FLUX.1-dev, transformer/config.json (axes_dims_rope: diffusers' default, FLUX.1's).
FLUX1_DEV_TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
SMALL_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}
# diffusers' examples/dreambooth/train_dreambooth_lora_flux.py `target_modules` without `--lora_layers`
# (v0.40.0 and the newest main read; the venv holds no examples). peft matches them as name suffixes, so
# single blocks' attn.to_q/k/v carry a LoRA too; single blocks' proj_mlp and proj_out are not targets
# (`linear1` gets zero rows for proj_mlp; `linear2` nothing).
DIFFUSERS_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
COMFY = "diffusion_model."  # ComfyUI's model keys: the BFL layout under this prefix
# Different scales (alpha / rank) within each fused module: q 4.0, k 0.5, v 2.0; add_v 6.0; proj_mlp 1.0.
MIXED_RANKS = {r"attn\.to_q": 2, r"attn\.to_k": 5, r"attn\.add_v_proj": 1, "proj_mlp": 6}
MIXED_ALPHAS = {r"attn\.to_q": 8.0, r"attn\.to_k": 2.5, "proj_mlp": 6.0}
# LoRA shapes: targets (None: every Linear), rank, alpha, rank and alpha patterns.
LORAS: dict[str, tuple[tuple[str, ...] | None, int, int, dict[str, int], dict[str, float]]] = {
    "diffusers-default": (DIFFUSERS_TARGETS, 4, 8, {}, {}),
    "every-linear": (None, 4, 4, {}, {}),
    "mixed-scales": (None, 3, 6, MIXED_RANKS, MIXED_ALPHAS),
}
# diffusers' kohya loader splits `linear1` at FLUX.1-dev's widths (3072 x 3 + 12288, hard-coded): the small
# model's single-block q/k/v/proj_mlp stay out of its check; FLUX.1-dev's are checked at full width.
LINEAR1_PARTS = re.compile(r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)$")
TOLERANCE = 1e-5
LORA_STD = 0.1
# The transformer's modules outside its blocks; diffusers' kohya loader (0.42.1) names them without the
# `transformer.` prefix, so its `load_lora_weights` drops them (see `_diffusers_lora`).
TOP_LEVEL = re.compile(r"(x_embedder|context_embedder|time_text_embed\..*|norm_out\.linear|proj_out)$")


@pytest.fixture(scope="module")
def flux1_dev() -> FluxTransformer2DModel:
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(FLUX1_DEV_TRANSFORMER_CONFIG)


@pytest.fixture(scope="module")
def small_base() -> FluxTransformer2DModel:
    """A small FLUX transformer, every weight random (seeded), no LoRA."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**SMALL_CONFIG).eval()
    randomize(transformer.parameters(), seed=1, std=0.1)
    return transformer


@pytest.fixture(scope="module")
def small_inputs() -> dict[str, torch.Tensor]:
    """A 4x4-token image (packed latents) and 8 text tokens, fixed."""
    generator = torch.Generator().manual_seed(2)
    return {
        "hidden_states": torch.randn(1, 16, SMALL_CONFIG["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, SMALL_CONFIG["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(1, SMALL_CONFIG["pooled_projection_dim"], generator=generator),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 4, 4, torch.device("cpu"), torch.float32),
        "txt_ids": torch.zeros(8, 3),
    }


# -- FLUX.1-dev: names and shapes as ComfyUI holds them ---------------------------------------------------


def test_given_flux1_dev_with_diffusers_default_targets_when_named_for_kohya_then_comfyui_maps_every_module(
    flux1_dev: FluxTransformer2DModel,
) -> None:
    transformer = copy.deepcopy(flux1_dev)
    with torch.device("meta"):
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(DIFFUSERS_TARGETS)))
    state, alphas = peft_lora(transformer)

    converted = kohya_flux_names(state, alphas, FLUX1_DEV_TRANSFORMER_CONFIG)

    flux_map = comfyui_flux_to_diffusers(FLUX1_DEV_TRANSFORMER_CONFIG, COMFY)
    model = _bfl_shapes(flux1_dev, flux_map)
    key_map = comfyui_flux_lora_key_map(model, flux_map)
    modules = kohya_modules(converted)
    # sd-scripts' networks/flux_merge_lora.py names a BFL model's weights the same way (`lora_unet_` + path).
    assert modules <= set(key_map)
    # Every peft module is in the converted file: the ranks ComfyUI's map sends to each BFL weight add up.
    ranks: dict[str, int] = {}
    for module in alphas:
        target = flux_map[f"{module}.weight"].key
        ranks[target] = ranks.get(target, 0) + int(state[f"{module}.lora_A.weight"].shape[0])
    assert {key_map[module].key for module in modules} == set(ranks)
    for module in modules:
        rows, columns = model[key_map[module].key]
        assert converted[f"{module}.lora_up.weight"].shape == (rows, ranks[key_map[module].key])
        assert converted[f"{module}.lora_down.weight"].shape == (ranks[key_map[module].key], columns)
    # 19 double blocks x 12 modules + 38 single blocks x q/k/v -> 19 x 8 + 38 x linear1.
    assert (len(alphas), len(modules)) == (342, 190)
    # rank 4, alpha 8 everywhere: plain modules keep alpha 8, the fused ones (3 parts) have rank 12, alpha 24.
    fused = {module for module in modules if module.endswith(("_qkv", "_linear1"))}
    assert {float(converted[f"{module}.alpha"]) for module in fused} == {24.0}
    assert {float(converted[f"{module}.alpha"]) for module in modules - fused} == {8.0}
    # The names diffusers' converter gives (what the trainer wrote before) reach nothing in ComfyUI.
    unconverted = {
        f"{prefix}{module.replace('.', '_')}"
        for module in alphas
        for prefix in ("lora_unet_", "transformer_")
    }
    assert not unconverted & set(key_map)


def test_given_comfyui_flux_layout_when_diffusers_converts_it_back_then_every_flux1_dev_weight_returns(
    flux1_dev: FluxTransformer2DModel,
) -> None:
    # One random column per weight (the converters only split and stack rows): FLUX.1-dev's real layout.
    generator = torch.Generator().manual_seed(0)
    thin = {
        key: torch.randn((value.shape[0], 1)[: value.dim()], generator=generator)
        for key, value in flux1_dev.state_dict().items()
    }
    bfl = comfyui_convert_diffusers_flux(thin, comfyui_flux_to_diffusers(FLUX1_DEV_TRANSFORMER_CONFIG))

    remaining = dict(bfl)
    back = convert_flux_transformer_checkpoint_to_diffusers(remaining)

    assert not remaining  # diffusers' converter took every BFL key ComfyUI's layout has
    assert set(back) == set(thin)
    assert all(torch.equal(back[key], thin[key]) for key in thin)


@pytest.mark.parametrize(
    "config", [FLUX1_DEV_TRANSFORMER_CONFIG, SMALL_CONFIG, {**SMALL_CONFIG, "guidance_embeds": False}]
)
def test_given_a_flux_transformer_when_its_linears_are_grouped_then_each_has_one_bfl_module_comfyui_holds(
    config: dict[str, Any],
) -> None:
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    flux_map = comfyui_flux_to_diffusers(config)

    modules = bfl_modules(config)

    parts = [part for module in modules for part in module.parts]
    assert sorted(parts) == sorted(linear_names(transformer))  # each Linear once
    for module in modules:  # the BFL name is where ComfyUI puts each part, in the same rows
        start = 0
        for part, rows in zip(module.parts, module.rows, strict=True):
            target = flux_map[f"{part}.weight"]
            assert target.key == f"{module.name}.weight"
            if target.rows is not None:
                assert target.rows == (start, rows)
                start += target.rows[1]


# -- the fused layout ------------------------------------------------------------------------------------


def test_given_equal_q_k_v_loras_when_fused_then_rank_and_alpha_are_3x_and_the_up_block_diagonal() -> None:
    parts = (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
    )
    loras = {part: random_lora(32, 32, rank=2, alpha=3.0, seed=index) for index, part in enumerate(parts)}

    fused = bfl_loras(loras, SMALL_CONFIG)["double_blocks.0.img_attn.qkv"]

    assert (fused.rank, fused.alpha) == (6, 9.0)
    assert torch.equal(fused.down, torch.cat([loras[part].down for part in parts]))
    for row, part in enumerate(parts):
        for column in range(3):
            block = fused.up[row * 32 : (row + 1) * 32, column * 2 : (column + 1) * 2]
            assert torch.equal(block, loras[part].up if row == column else torch.zeros_like(block))


def test_given_single_block_q_k_v_without_proj_mlp_when_fused_then_linear1_has_zero_mlp_rows() -> None:
    parts = [f"single_transformer_blocks.1.attn.to_{name}" for name in "qkv"]
    loras = {part: random_lora(32, 32, rank=4, alpha=4.0, seed=index) for index, part in enumerate(parts)}

    fused = bfl_loras(loras, SMALL_CONFIG)["single_blocks.1.linear1"]

    assert fused.up.shape == (3 * 32 + 4 * 32, 12)
    assert not fused.up[3 * 32 :].any()
    assert delta(fused)[: 3 * 32].allclose(torch.cat([delta(loras[part]) for part in parts]))


@pytest.mark.parametrize(
    ("ranks", "alphas", "folded"),
    [
        ((2, 4, 1), (4.0, 8.0, 2.0), False),
        ((2, 4, 1), (1.0, 8.0, 3.0), True),
        ((3, 3, 3), (1.0, 2.0, 3.0), True),
    ],
)
def test_given_fused_parts_with_any_ranks_and_alphas_when_fused_then_the_fused_lora_adds_each_parts_delta(
    ranks: tuple[int, ...], alphas: tuple[float, ...], folded: bool
) -> None:
    parts = [f"transformer_blocks.1.attn.add_{name}_proj" for name in "qkv"]
    loras = {
        part: random_lora(32, 32, rank, alpha, seed=index)
        for index, (part, rank, alpha) in enumerate(zip(parts, ranks, alphas, strict=True))
    }

    fused = bfl_loras(loras, SMALL_CONFIG)["double_blocks.1.txt_attn.qkv"]

    assert fused.rank == sum(ranks)
    # Equal scales keep the alpha (scale * rank); different ones are folded into the up (alpha = rank).
    assert fused.alpha == (sum(ranks) if folded else alphas[0] / ranks[0] * sum(ranks))
    expected = torch.cat([delta(loras[part]) for part in parts])
    assert (delta(fused) - expected).abs().max() < TOLERANCE


def test_given_the_final_modulation_when_converted_then_its_halves_swap_and_its_scale_is_folded() -> None:
    lora = random_lora(32, 2 * 32, rank=4, alpha=2.0, seed=0)

    fused = bfl_loras({"norm_out.linear": lora}, SMALL_CONFIG)["final_layer.adaLN_modulation.1"]

    scale_then_shift = delta(lora)
    assert fused.alpha == fused.rank  # diffusers' kohya loader ignores final_layer alphas
    assert delta(fused).allclose(torch.cat([scale_then_shift[32:], scale_then_shift[:32]]))


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "transformer_transformer_blocks_2_attn_to_q.lora_down.weight",
            "no ComfyUI/sd-scripts name",
        ),  # the config has 2 blocks
        ("transformer_pos_embed_proj.lora_down.weight", "no ComfyUI/sd-scripts name"),
        ("transformer_transformer_blocks_0_attn_to_q.dora_scale", "not a plain LoRA"),
    ],
)
def test_given_a_module_or_key_with_no_bfl_counterpart_when_converted_then_it_is_refused(
    key: str, message: str
) -> None:
    kohya = kohya_pair("transformer_transformer_blocks_0_attn_to_q", 32, 32) | {key: torch.zeros(2, 32)}

    with pytest.raises(ValueError, match=message):
        flux_kohya_names(kohya, SMALL_CONFIG)


def test_given_a_lora_wider_than_the_config_says_when_converted_then_it_is_refused() -> None:
    kohya = kohya_pair("transformer_single_transformer_blocks_0_proj_mlp", 32, 3 * 32)

    with pytest.raises(ValueError, match="rows"):
        flux_kohya_names(kohya, SMALL_CONFIG)


def test_given_clip_l_keys_when_the_transformer_is_renamed_then_they_stay_as_sd_scripts_name_them() -> None:
    clip = kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    transformer = kohya_pair("transformer_transformer_blocks_0_attn_to_out_0", 32, 32)

    converted = flux_kohya_names(clip | transformer, SMALL_CONFIG)

    assert all(converted[key] is value for key, value in clip.items())
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in comfyui_clip_l_lora_names(12)
    assert kohya_modules(converted) == {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_double_blocks_0_img_attn_proj",
    }


# -- exactness on a small transformer --------------------------------------------------------------------


@pytest.mark.parametrize("lora_shape", LORAS)
def test_given_a_small_flux_lora_when_comfyui_merges_its_kohya_file_then_the_output_is_the_peft_loras(
    lora_shape: str, small_base: FluxTransformer2DModel, small_inputs: dict[str, torch.Tensor]
) -> None:
    trained = _with_lora(small_base, lora_shape)
    kohya = flux_kohya_names(trainer_kohya(trained), small_base.config)

    flux_map = comfyui_flux_to_diffusers(SMALL_CONFIG, COMFY)
    model = comfyui_convert_diffusers_flux(_cloned(small_base.state_dict()), flux_map)
    not_loaded = comfyui_apply_lora(model, kohya, comfyui_flux_lora_key_map(model, flux_map))
    merged = FluxTransformer2DModel(**SMALL_CONFIG).eval()
    merged.load_state_dict(bfl_flux_to_diffusers(model, flux_map), strict=True)

    assert not_loaded == []
    expected = forward(trained, small_inputs)
    assert (expected - forward(small_base, small_inputs)).abs().max() > 0.1  # the LoRA matters
    assert (forward(merged, small_inputs) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("lora_shape", LORAS)
def test_given_a_small_flux_lora_when_diffusers_loads_its_kohya_file_then_the_output_is_the_peft_loras(
    lora_shape: str, small_base: FluxTransformer2DModel, small_inputs: dict[str, torch.Tensor]
) -> None:
    trained = _with_lora(small_base, lora_shape, exclude=LINEAR1_PARTS)
    kohya = flux_kohya_names(trainer_kohya(trained), small_base.config)

    loaded = copy.deepcopy(small_base)
    loaded.load_lora_adapter(_diffusers_lora(kohya), prefix="transformer")

    expected = forward(trained, small_inputs)
    assert (expected - forward(small_base, small_inputs)).abs().max() > 0.1
    assert (forward(loaded, small_inputs) - expected).abs().max() < TOLERANCE


def test_given_the_peft_lora_or_the_trainers_kohya_dict_when_converted_then_both_give_the_same_file(
    small_base: FluxTransformer2DModel,
) -> None:
    trained = _with_lora(small_base, "mixed-scales")
    state, alphas = peft_lora(trained)

    from_peft = kohya_flux_names(state, alphas, SMALL_CONFIG)
    # The shape really mixes ranks and scales (peft applied the patterns).
    ranks = {module: int(state[f"{module}.lora_A.weight"].shape[0]) for module in alphas}
    assert set(ranks.values()) == {1, 2, 3, 5, 6}
    assert {alphas[module] / ranks[module] for module in alphas} == {0.5, 1.0, 2.0, 4.0, 6.0}
    from_kohya = flux_kohya_names(trainer_kohya(trained), SMALL_CONFIG)

    assert from_peft.keys() == from_kohya.keys()
    assert all(torch.equal(from_peft[key], from_kohya[key]) for key in from_peft)


# -- FLUX.1-dev at full width through diffusers' kohya loader ---------------------------------------------


def test_given_a_flux1_dev_lora_of_mixed_scales_when_diffusers_loads_its_kohya_file_then_each_delta_is_kept(
    flux1_dev: FluxTransformer2DModel,
) -> None:
    # Every Linear but proj_mlp (`linear1` gets zero rows), ranks 1-5, scales 0.5-4: real widths, small file.
    transformer = copy.deepcopy(flux1_dev)
    targets = [name for name in linear_names(transformer) if not name.endswith("proj_mlp")]
    rank_pattern, alpha_pattern = matching(MIXED_RANKS, targets), matching(MIXED_ALPHAS, targets)
    config = LoraConfig(
        r=1, lora_alpha=3, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
    with torch.device("meta"):
        transformer.add_adapter(config)
    shapes, alphas = peft_lora(transformer)
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(value.shape, generator=generator) * 0.1 for key, value in shapes.items()}

    loaded = _diffusers_lora(kohya_flux_names(state, alphas, FLUX1_DEV_TRANSFORMER_CONFIG))

    modules = {
        key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in loaded if "lora_A" in key
    }
    assert modules == set(alphas) | {f"single_transformer_blocks.{i}.proj_mlp" for i in range(38)}
    worst = 0.0
    for module in modules:  # each module's `delta @ probe`, products in float64: the weights' own rounding
        down, up = (loaded[f"transformer.{module}.lora_{ab}.weight"].double() for ab in "AB")
        probe = torch.randn(down.shape[1], 2, generator=generator, dtype=torch.float64) / down.shape[1] ** 0.5
        expected = torch.zeros(up.shape[0], 2, dtype=torch.float64)  # proj_mlp: untrained, zero rows
        if module in alphas:
            lora_down, lora_up = (state[f"{module}.lora_{ab}.weight"].double() for ab in "AB")
            expected = alphas[module] / lora_down.shape[0] * (lora_up @ (lora_down @ probe))
        worst = max(worst, float((up @ (down @ probe) - expected).abs().max()))
    assert worst < TOLERANCE


# -- helpers ----------------------------------------------------------------------------------------------


def _diffusers_lora(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' kohya loader (`FluxPipeline.lora_state_dict`, what `load_lora_weights` runs) on the file,
    the `transformer.` prefix its sd-scripts conversion leaves off the top-level modules put back: their
    weights are right, but `load_lora_weights` filters by that prefix and would drop them unannounced."""
    state: dict[str, torch.Tensor] = FluxPipeline.lora_state_dict(dict(kohya))
    unprefixed = {key.split(".lora_")[0] for key in state if not key.startswith("transformer.")}
    assert all(TOP_LEVEL.match(module) for module in unprefixed), unprefixed
    return {
        key if key.startswith("transformer.") else f"transformer.{key}": value for key, value in state.items()
    }


def _with_lora(base: FluxTransformer2DModel, lora_shape: str, exclude: re.Pattern[str] | None = None) -> Any:
    """A copy of `base` with a LoRA of that shape, its up and down weights random (a fresh up is zero)."""
    targets, rank, alpha, ranks, alphas = LORAS[lora_shape]
    names = [
        name
        for name in linear_names(base)
        if (targets is None or any(name.endswith(target) for target in targets))
        and not (exclude and exclude.search(name))
    ]
    transformer = copy.deepcopy(base)
    ranks, alphas = matching(ranks, names), matching(alphas, names)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, rank_pattern=ranks, alpha_pattern=alphas)
    )
    randomize((p for n, p in transformer.named_parameters() if "lora_" in n), seed=3, std=LORA_STD)
    return transformer


def _bfl_shapes(
    transformer: FluxTransformer2DModel, flux_map: dict[str, ComfyFluxTarget]
) -> dict[str, tuple[int, int]]:
    """ComfyUI's model weights (BFL keys) -> (rows, columns), from the diffusers model's shapes."""
    shapes: dict[str, tuple[int, int]] = {}
    for key, value in transformer.state_dict().items():
        if key.endswith(".weight") and value.dim() == 2:
            target = flux_map[key]
            rows, columns = shapes.get(target.key, (0, int(value.shape[1])))
            shapes[target.key] = (rows + int(value.shape[0]), columns)
    return shapes


def _cloned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in state.items()}
