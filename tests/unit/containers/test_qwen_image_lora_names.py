"""The Qwen-Image kohya file (`QwenImage.kohya_names`): musubi-tuner's names (`lora_unet_transformer_blocks_0_
attn_to_q`), each of which ComfyUI maps to a weight of its Qwen-Image model, and a file that merges to exactly
what the trained LoRA (and the diffusers-format file) adds.

Checked on Qwen-Image's real transformer (built on the meta device from Qwen/Qwen-Image's transformer
config: names and shapes) and on a small `QwenImageTransformer2DModel` (outputs). ComfyUI's model and key map
come from a port of ComfyUI's own code (`comfy_qwen_image`), never from the code under test.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from comfy_qwen_image import COMFY, comfyui_qwen_image_lora_key_map, comfyui_qwen_image_weights
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
from lora_clients import ComfyFluxTarget, comfyui_apply_lora
from lora_testing import forward, kohya_modules, linear_names, randomize
from loraflow_diffusion.families import family_named
from loraflow_training.kohya import ComponentLora, to_kohya_state_dict
from loraflow_training.outputs import save_diffusers_lora, trained_loras
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

pytestmark = pytest.mark.slow  # builds Qwen-Image's transformer (on the meta device) and runs a small one

# Qwen/Qwen-Image transformer/config.json (diffusers' defaults for QwenImageTransformer2DModel too).
QWEN_IMAGE_TRANSFORMER_CONFIG: dict[str, Any] = {
    "_class_name": "QwenImageTransformer2DModel",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
SMALL_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": [4, 6, 6],
}
FAMILY = family_named("qwen_image")
# LoRA shapes: targets (None: every Linear), rank, alpha, rank and alpha patterns (scales 0.5 to 6).
LORAS: dict[str, tuple[tuple[str, ...] | None, int, float, dict[str, int], dict[str, float]]] = {
    "diffusers-default": (FAMILY.denoiser_target_modules, 4, 8.0, {}, {}),
    "every-linear": (None, 3, 6.0, {r"attn\.to_k": 5, "img_mod.1": 1}, {r"attn\.to_k": 2.5, "proj_out": 6.0}),
}
TOLERANCE = 1e-6  # relative to the output's largest value: float32 rounding
LORA_STD = 0.3


@pytest.fixture(scope="module")
def qwen_image() -> QwenImageTransformer2DModel:
    with torch.device("meta"):
        return QwenImageTransformer2DModel.from_config(QWEN_IMAGE_TRANSFORMER_CONFIG)


@pytest.fixture(scope="module")
def small_base() -> QwenImageTransformer2DModel:
    """A small Qwen-Image transformer, every weight random (seeded), no LoRA."""
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**SMALL_CONFIG).eval()
    randomize(transformer.parameters(), seed=1, std=0.1)
    return transformer


@pytest.fixture(scope="module")
def small_inputs() -> dict[str, Any]:
    """A 4x4-patch image (packed latents), 6 text tokens of which the last 2 are masked padding, t = 0.7."""
    generator = torch.Generator().manual_seed(2)
    return {
        "hidden_states": torch.randn(1, 16, SMALL_CONFIG["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(1, 6, SMALL_CONFIG["joint_attention_dim"], generator=generator),
        "encoder_hidden_states_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
        "timestep": torch.tensor([0.7]),
        "img_shapes": [[(1, 4, 4)]],
    }


# -- Qwen-Image at full size: names and shapes as ComfyUI holds them --------------------------------------


def test_given_qwen_image_config_when_comfyui_builds_its_model_then_it_holds_diffusers_names_and_shapes(
    qwen_image: QwenImageTransformer2DModel,
) -> None:
    comfy = comfyui_qwen_image_weights(QWEN_IMAGE_TRANSFORMER_CONFIG)

    diffusers = {COMFY + key: tuple(value.shape) for key, value in qwen_image.state_dict().items()}
    assert comfy == diffusers  # the published files load into either without renaming
    # 20.43B parameters: the family's footprint counts the same model.
    assert sum(torch.Size(shape).numel() for shape in comfy.values()) == FAMILY.footprint.denoiser_params


def test_given_a_real_size_lora_with_the_family_targets_when_named_for_kohya_then_comfyui_maps_every_tensor(
    qwen_image: QwenImageTransformer2DModel,
) -> None:
    transformer = copy.deepcopy(qwen_image)
    with torch.device("meta"):
        transformer.add_adapter(
            LoraConfig(r=4, lora_alpha=2, target_modules=list(FAMILY.denoiser_target_modules))
        )
    loras = [_random_weights(transformer)]

    kohya = FAMILY.kohya_names(
        cast(Any, SimpleNamespace(transformer=transformer)), to_kohya_state_dict(loras)
    )

    comfy = comfyui_qwen_image_weights(QWEN_IMAGE_TRANSFORMER_CONFIG)
    key_map = comfyui_qwen_image_lora_key_map(comfy)
    modules = kohya_modules(kohya)
    assert modules <= set(key_map)  # every module lands on a ComfyUI weight
    assert all(module.startswith("lora_unet_transformer_blocks_") for module in modules)
    for module in modules:
        rows, columns = comfy[key_map[module]]
        assert kohya[f"{module}.lora_up.weight"].shape == (rows, 4)
        assert kohya[f"{module}.lora_down.weight"].shape == (4, columns)
        assert float(kohya[f"{module}.alpha"]) == 2.0
    # 60 blocks x to_q/k/v/out.0 (peft's suffix match leaves add_*_proj and to_add_out alone), 3 tensors each.
    assert (len(modules), len(kohya)) == (240, 720)
    assert FAMILY.footprint.denoiser_lora_params_per_rank == sum(
        sum(comfy[key_map[module]]) for module in modules
    )
    # diffusers' converter names (what `kohya_names` is given) reach nothing in ComfyUI.
    unconverted = kohya_modules(to_kohya_state_dict(loras))
    assert not unconverted & set(key_map)


# -- exactness on a small transformer --------------------------------------------------------------------


@pytest.mark.parametrize("lora_shape", LORAS)
def test_given_a_small_lora_when_comfyui_merges_the_kohya_file_then_it_adds_what_the_diffusers_file_adds(
    lora_shape: str, small_base: QwenImageTransformer2DModel, small_inputs: dict[str, Any], tmp_path: Path
) -> None:
    trained = _with_lora(small_base, lora_shape)
    pipe = QwenImagePipeline(None, None, None, None, trained)  # type: ignore[arg-type]
    loras = trained_loras(pipe)
    kohya = FAMILY.kohya_names(pipe, to_kohya_state_dict(loras))
    diffusers_file = save_diffusers_lora(tmp_path, pipe, loras)

    model = {COMFY + key: value.clone() for key, value in small_base.state_dict().items()}
    not_loaded = comfyui_apply_lora(model, kohya, _targets(comfyui_qwen_image_lora_key_map(model)))
    merged = QwenImageTransformer2DModel(**SMALL_CONFIG).eval()
    merged.load_state_dict({key.removeprefix(COMFY): value for key, value in model.items()}, strict=True)
    from_diffusers_file = _loaded(small_base, diffusers_file)
    from_kohya_file = _loaded(small_base, kohya)

    assert not_loaded == []
    expected = forward(trained, small_inputs)
    assert (expected - forward(small_base, small_inputs)).abs().max() > 0.1  # the LoRA matters
    assert _close(forward(merged, small_inputs), expected)
    assert _close(forward(from_diffusers_file, small_inputs), expected)
    assert _close(forward(from_kohya_file, small_inputs), expected)  # diffusers' loader reads it too


@pytest.mark.parametrize(
    "key",
    [
        "transformer_transformer_blocks_2_attn_to_q.lora_down.weight",  # the config has 2 blocks
        "transformer_pos_embed.lora_down.weight",  # no Linear there
        "transformer_transformer_blocks_0_attn_to_q_base_layer.lora_down.weight",  # peft's, not the model's
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # no text encoder LoRA
    ],
)
def test_given_a_key_of_no_transformer_module_when_named_for_kohya_then_it_is_refused(
    key: str, small_base: QwenImageTransformer2DModel
) -> None:
    transformer = _with_lora(small_base, "diffusers-default")
    pipe = cast(Any, SimpleNamespace(transformer=transformer))

    with pytest.raises(ValueError, match="not a LoRA module of the Qwen-Image transformer"):
        FAMILY.kohya_names(pipe, {key: torch.zeros(2, 32)})


# -- helpers ----------------------------------------------------------------------------------------------


def _targets(key_map: dict[str, str]) -> dict[str, ComfyFluxTarget]:
    """ComfyUI's map in the form `comfyui_apply_lora` takes (Qwen-Image has no fused weights)."""
    return {name: ComfyFluxTarget(key) for name, key in key_map.items()}


def _random_weights(transformer: torch.nn.Module) -> ComponentLora:
    """A meta-device transformer's LoRA as the trainer reads it (peft keys, each module's alpha), its tensors
    random CPU tensors of the same shapes: real widths, small ranks."""
    generator = torch.Generator().manual_seed(0)
    shapes = get_peft_model_state_dict(transformer)
    state = {key: torch.randn(value.shape, generator=generator) for key, value in shapes.items()}
    alphas = {
        name: float(layer.lora_alpha["default"])
        for name, layer in transformer.named_modules()
        if isinstance(layer, LoraLayer)
    }
    return ComponentLora("transformer", state, alphas)


def _loaded(base: QwenImageTransformer2DModel, lora: Path | dict[str, torch.Tensor]) -> Any:
    """A copy of `base` with the file loaded as `QwenImagePipeline.load_lora_weights` reads it."""
    state, metadata = QwenImagePipeline.lora_state_dict(
        str(lora) if isinstance(lora, Path) else dict(lora), return_lora_metadata=True
    )
    transformer = copy.deepcopy(base)
    transformer.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    return transformer


def _with_lora(base: QwenImageTransformer2DModel, lora_shape: str) -> Any:
    """A copy of `base` with a LoRA of that shape, its up and down weights random (a fresh up is zero)."""
    targets, rank, alpha, ranks, alphas = LORAS[lora_shape]
    transformer = copy.deepcopy(base)
    names = linear_names(base) if targets is None else list(targets)
    transformer.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # peft computes alpha / r with any number
            target_modules=names,
            rank_pattern=ranks,
            alpha_pattern=alphas,
        )
    )
    randomize((p for n, p in transformer.named_parameters() if "lora_" in n), seed=3, std=LORA_STD)
    return transformer


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((actual - expected).abs().max() <= TOLERANCE * max(1.0, float(expected.abs().max())))
