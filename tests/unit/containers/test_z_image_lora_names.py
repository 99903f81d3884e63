"""ComfyUI's names for the kohya file's Z-Image transformer LoRA (`z_image_names`): every module lands on a
Linear of the model ComfyUI holds (its Lumina 2 `NextDiT`, Z-Image's original layout), and the fused
`attention.qkv` applies exactly what the peft LoRA adds.

Checked on Z-Image-Turbo's real transformer (built on the meta device from its published config: names,
shapes, counts) and on a small `ZImageTransformer2DModel` (outputs, through ComfyUI's merge and diffusers' own
kohya loader). ComfyUI's layout comes from a port of its own mapping (`comfy_z_image`), itself checked against
diffusers' single-file converter, never from the code under test."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from comfy_z_image import (
    ComfyTarget,
    comfyui_convert_diffusers_z_image,
    comfyui_merged,
    comfyui_z_image_lora_key_map,
    comfyui_z_image_to_diffusers,
)
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
from lora_testing import (
    delta,
    kohya_pair,
    linear_names,
    matching,
    peft_lora,
    random_lora,
    randomize,
    trainer_kohya,
)
from loraflow_diffusion.families.flux_names import ModuleLora
from loraflow_diffusion.families.z_image import ZImage
from loraflow_diffusion.families.z_image_names import comfy_loras, comfy_modules, z_image_kohya_names
from peft import LoraConfig

pytestmark = pytest.mark.slow  # builds Z-Image's transformer (on the meta device) and runs a small one

# Tongyi-MAI/Z-Image-Turbo, transformer/config.json (as quoted by several public loaders; Z-Image Base has the
# same). axes_lens does not change a weight.
Z_IMAGE_TURBO_TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "ZImageTransformer2DModel",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}
SMALL_CONFIG: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 16,
    "axes_dims": [4, 6, 6],
    "axes_lens": [64, 32, 32],
}
COMFY = "diffusion_model."  # ComfyUI's model keys: its layout under this prefix
DIFFUSERS_TARGETS = ZImage.denoiser_target_modules  # train_dreambooth_lora_z_image.py's default
# Different scales (alpha / rank) within the fused q/k/v: q 4.0, k 0.5, v 2.0 (rank 3, alpha 6).
MIXED_RANKS = {r"attention\.to_q": 2, r"attention\.to_k": 5, r"feed_forward\.w1": 1}
MIXED_ALPHAS = {r"attention\.to_q": 8.0, r"attention\.to_k": 2.5}
# LoRA shapes: targets (None: every Linear), rank, alpha, rank and alpha patterns.
LORAS: dict[str, tuple[tuple[str, ...] | None, int, int, dict[str, int], dict[str, float]]] = {
    "diffusers-default": (DIFFUSERS_TARGETS, 4, 8, {}, {}),
    "every-linear": (None, 4, 4, {}, {}),
    "mixed-scales": (None, 3, 6, MIXED_RANKS, MIXED_ALPHAS),
}
# diffusers' Z-Image kohya loader (0.42.1) turns ComfyUI's `final_layer_*` and `x_embedder` into module paths
# the model does not have and drops them with a warning: they stay out of its check.
UNMAPPED_BY_DIFFUSERS = re.compile(r"^all_(final_layer|x_embedder)\.")
TOLERANCE = 1e-5
LORA_STD = 0.1


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def z_image_turbo() -> ZImageTransformer2DModel:
    with torch.device("meta"):
        return ZImageTransformer2DModel.from_config(Z_IMAGE_TURBO_TRANSFORMER_CONFIG)


@pytest.fixture(scope="module")
def small_base() -> ZImageTransformer2DModel:
    """A small Z-Image transformer, every weight random (seeded; pad tokens too), no LoRA."""
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**SMALL_CONFIG).eval()
    randomize(transformer.parameters(), seed=1, std=0.1)
    return transformer


@pytest.fixture(scope="module")
def small_inputs() -> dict[str, Any]:
    """Two one-frame 4x4-token images (8x8 latents) with captions of 8 and 5 tokens, as the pipeline passes
    them (lists), at two times."""
    generator = torch.Generator().manual_seed(2)
    return {
        "x": [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(2)],
        "t": torch.tensor([0.7, 0.2]),
        "cap_feats": [torch.randn(length, 16, generator=generator) for length in (8, 5)],
    }


# -- Z-Image-Turbo: names and shapes as ComfyUI holds them ------------------------------------------------


def test_given_turbo_with_diffusers_default_targets_when_named_for_kohya_then_comfyui_maps_every_module(
    z_image_turbo: ZImageTransformer2DModel,
) -> None:
    transformer = copy.deepcopy(z_image_turbo)
    with torch.device("meta"):
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(DIFFUSERS_TARGETS)))
    state, alphas = peft_lora(transformer)

    converted = comfy_loras(_module_loras(state, alphas), Z_IMAGE_TURBO_TRANSFORMER_CONFIG)

    z_map = comfyui_z_image_to_diffusers(Z_IMAGE_TURBO_TRANSFORMER_CONFIG, COMFY)
    model = _comfy_shapes(z_image_turbo, z_map)
    key_map = comfyui_z_image_lora_key_map(model, z_map)
    modules = {"lora_unet_" + name.replace(".", "_"): lora for name, lora in converted.items()}
    assert set(modules) <= set(key_map)
    # Every peft module is in the converted file: the ranks ComfyUI's map sends to each weight add up.
    ranks: dict[str, int] = {}
    for module in alphas:
        target = z_map[f"{module}.weight"].key
        ranks[target] = ranks.get(target, 0) + int(state[f"{module}.lora_A.weight"].shape[0])
    assert {key_map[module].key for module in modules} == set(ranks)
    for module, lora in modules.items():
        rows, columns = model[key_map[module].key]
        assert lora.up.shape == (rows, ranks[key_map[module].key])
        assert lora.down.shape == (ranks[key_map[module].key], columns)
    # (30 layers + 2 noise + 2 context refiners) x (q, k, v, out) -> 34 x (qkv, out).
    assert (len(alphas), len(modules)) == (136, 68)
    # rank 4, alpha 8: `out` keeps alpha 8; the fused qkv (3 parts) has rank 12, alpha 24 (musubi: alpha * 3).
    fused = {name for name in modules if name.endswith("_qkv")}
    assert {modules[name].alpha for name in fused} == {24.0}
    assert {modules[name].alpha for name in set(modules) - fused} == {8.0}
    # The names diffusers' converter gives (and musubi-tuner writes) reach nothing in ComfyUI.
    unconverted = {f"{p}{m.replace('.', '_')}" for m in alphas for p in ("lora_unet_", "transformer_")}
    assert not unconverted & set(key_map)


def test_given_comfyui_z_image_layout_when_diffusers_converts_it_back_then_every_turbo_weight_returns(
    z_image_turbo: ZImageTransformer2DModel,
) -> None:
    # One random column per weight (the converters only split, stack and rename rows): the real layout.
    generator = torch.Generator().manual_seed(0)
    thin = {
        key: torch.randn((value.shape[0], 1)[: value.dim()], generator=generator)
        for key, value in z_image_turbo.state_dict().items()
    }
    comfy = comfyui_convert_diffusers_z_image(
        thin, comfyui_z_image_to_diffusers(Z_IMAGE_TURBO_TRANSFORMER_CONFIG)
    )

    remaining = {f"model.diffusion_model.{key}": value for key, value in comfy.items()}
    back = convert_z_image_transformer_checkpoint_to_diffusers(remaining)

    assert not remaining  # diffusers' converter took every key of ComfyUI's layout
    assert set(back) == set(thin)
    assert all(torch.equal(back[key], thin[key]) for key in thin)


@pytest.mark.parametrize("config", [Z_IMAGE_TURBO_TRANSFORMER_CONFIG, SMALL_CONFIG])
def test_given_a_z_image_transformer_when_its_linears_are_grouped_then_each_has_one_module_comfyui_holds(
    config: dict[str, Any],
) -> None:
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config(config)
    z_map = comfyui_z_image_to_diffusers(config)

    modules = comfy_modules(config)

    parts = [part for module in modules for part in module.parts]
    assert sorted(parts) == sorted(linear_names(transformer))  # each Linear once
    for module in modules:  # the ComfyUI name is where ComfyUI puts each part, in the same rows
        start, fused = 0, len(module.parts) > 1
        for index, part in enumerate(module.parts):
            target, rows = z_map[f"{part}.weight"], module.rows[index]
            assert target.key == f"{module.name}.weight"
            assert target.rows == ((start, rows) if fused else None)
            assert (rows is not None) == fused  # an unfused module keeps its LoRA's own rows
            start += rows or 0


# -- the fused layout ------------------------------------------------------------------------------------


def test_given_equal_q_k_v_loras_when_fused_then_rank_and_alpha_are_3x_and_the_up_block_diagonal() -> None:
    parts = [f"noise_refiner.0.attention.to_{name}" for name in "qkv"]
    loras = {part: random_lora(32, 32, rank=2, alpha=3.0, seed=index) for index, part in enumerate(parts)}

    fused = comfy_loras(loras, SMALL_CONFIG)["noise_refiner.0.attention.qkv"]

    assert (fused.rank, fused.alpha) == (6, 9.0)
    assert torch.equal(fused.down, torch.cat([loras[part].down for part in parts]))
    for row, part in enumerate(parts):
        for column in range(3):
            block = fused.up[row * 32 : (row + 1) * 32, column * 2 : (column + 1) * 2]
            assert torch.equal(block, loras[part].up if row == column else torch.zeros_like(block))


@pytest.mark.parametrize(
    ("present", "ranks", "alphas", "folded"),
    [
        ("qk", (2, 4), (4.0, 8.0), False),
        ("qkv", (2, 4, 1), (1.0, 8.0, 3.0), True),
        ("v", (3,), (1.5,), False),
    ],
)
def test_given_some_of_q_k_v_with_any_ranks_and_alphas_when_fused_then_the_lora_adds_each_parts_delta(
    present: str, ranks: tuple[int, ...], alphas: tuple[float, ...], folded: bool
) -> None:
    parts = [f"context_refiner.0.attention.to_{name}" for name in present]
    loras = {
        part: random_lora(32, 32, rank, alpha, seed=index)
        for index, (part, rank, alpha) in enumerate(zip(parts, ranks, alphas, strict=True))
    }

    fused = comfy_loras(loras, SMALL_CONFIG)["context_refiner.0.attention.qkv"]

    assert fused.rank == sum(ranks)
    # Equal scales keep the alpha (scale * rank); different ones are folded into the up (alpha = rank).
    assert fused.alpha == (sum(ranks) if folded else alphas[0] / ranks[0] * sum(ranks))
    expected = torch.cat([delta(loras[p]) if p in loras else torch.zeros(32, 32) for p in _qkv("context")])
    assert (delta(fused) - expected).abs().max() < TOLERANCE


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "transformer_layers_2_attention_to_q.lora_down.weight",
            "no ComfyUI/sd-scripts name",
        ),  # the config has 2 layers
        (
            "transformer_context_refiner_0_adaLN_modulation_0.lora_down.weight",
            "no ComfyUI/sd-scripts name",
        ),  # none there
        ("transformer_siglip_embedder_1.lora_down.weight", "no ComfyUI/sd-scripts name"),  # Omni's
        ("transformer_layers_0_attention_to_q.dora_scale", "not a plain LoRA"),
    ],
)
def test_given_a_module_or_key_comfyui_cannot_hold_when_converted_then_it_is_refused(
    key: str, message: str
) -> None:
    kohya = kohya_pair("transformer_layers_0_attention_to_q", 32, 32) | {key: torch.zeros(2, 32)}

    with pytest.raises(ValueError, match=message):
        z_image_kohya_names(kohya, SMALL_CONFIG)


def test_given_a_lora_wider_than_the_config_says_when_converted_then_it_is_refused() -> None:
    kohya = kohya_pair("transformer_layers_0_attention_to_k", 32, 3 * 32)

    with pytest.raises(ValueError, match="rows"):
        z_image_kohya_names(kohya, SMALL_CONFIG)


# -- exactness on a small transformer --------------------------------------------------------------------


@pytest.mark.parametrize("lora_shape", LORAS)
def test_given_a_small_z_image_lora_when_comfyui_merges_its_kohya_file_then_the_output_is_the_peft_loras(
    lora_shape: str, small_base: ZImageTransformer2DModel, small_inputs: dict[str, Any]
) -> None:
    trained = _with_lora(small_base, lora_shape)
    kohya = z_image_kohya_names(trainer_kohya(trained), small_base.config)

    merged, not_loaded = comfyui_merged(small_base, kohya)

    assert not_loaded == []
    expected = _forward(trained, small_inputs)
    assert (expected - _forward(small_base, small_inputs)).abs().max() > 0.1  # the LoRA matters
    assert (_forward(merged, small_inputs) - expected).abs().max() < TOLERANCE


@pytest.mark.parametrize("lora_shape", LORAS)
def test_given_a_small_z_image_lora_when_diffusers_loads_its_kohya_file_then_the_output_is_the_peft_loras(
    lora_shape: str, small_base: ZImageTransformer2DModel, small_inputs: dict[str, Any]
) -> None:
    trained = _with_lora(small_base, lora_shape, exclude=UNMAPPED_BY_DIFFUSERS)
    kohya = z_image_kohya_names(trainer_kohya(trained), small_base.config)

    loaded = copy.deepcopy(small_base)
    loaded.load_lora_adapter(ZImagePipeline.lora_state_dict(dict(kohya)), prefix="transformer")

    expected = _forward(trained, small_inputs)
    assert (expected - _forward(small_base, small_inputs)).abs().max() > 0.1
    assert (_forward(loaded, small_inputs) - expected).abs().max() < TOLERANCE


# -- helpers ----------------------------------------------------------------------------------------------


def _qkv(block: str) -> list[str]:
    return [f"{block}_refiner.0.attention.to_{name}" for name in "qkv"]


def _module_loras(state: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, ModuleLora]:
    return {
        module: ModuleLora(state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"], alpha)
        for module, alpha in alphas.items()
    }


def _with_lora(
    base: ZImageTransformer2DModel, lora_shape: str, exclude: re.Pattern[str] | None = None
) -> Any:
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


def _forward(transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The transformer on copies of the inputs (it rewrites the lists it is given), its outputs stacked."""
    with torch.no_grad():
        output = transformer(
            [x.clone() for x in inputs["x"]],
            inputs["t"],
            [c.clone() for c in inputs["cap_feats"]],
            return_dict=False,
        )[0]
    return torch.stack(output)


def _comfy_shapes(
    transformer: ZImageTransformer2DModel, z_map: dict[str, ComfyTarget]
) -> dict[str, tuple[int, int]]:
    """ComfyUI's model weights (keys of its layout) -> (rows, columns), from the diffusers model's shapes."""
    shapes: dict[str, tuple[int, int]] = {}
    for key, value in transformer.state_dict().items():
        if key.endswith(".weight") and value.dim() == 2:
            target = z_map[key]
            rows, columns = shapes.get(target.key, (0, int(value.shape[1])))
            shapes[target.key] = (rows + int(value.shape[0]), columns)
    return shapes
