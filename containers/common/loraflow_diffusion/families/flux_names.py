"""sd-scripts' FLUX.1 names for the kohya file's transformer LoRA (`lora_unet_double_blocks_0_img_attn_qkv`).

Why: the LoRA is trained on diffusers' `FluxTransformer2DModel`, whose module paths diffusers' kohya
converter writes as `transformer_transformer_blocks_0_attn_to_q`. ComfyUI and Forge key a FLUX LoRA by the
model they hold, Black Forest Labs' original layout ("BFL": `double_blocks.N.img_attn.qkv`), and sd-scripts
(`networks/lora_flux.py`, prefix `lora_unet`) trains and merges under those names; none of them reads
`lora_unet_transformer_blocks_…`: ComfyUI's `load_lora` finds no weight for such a key and only logs
"lora key not loaded", the LoRA silently weaker.

BFL fuses what diffusers keeps apart: a double block's `img_attn.qkv` holds `attn.to_q|to_k|to_v`,
`txt_attn.qkv` holds `attn.add_q_proj|add_k_proj|add_v_proj`, a single block's `linear1` holds
`attn.to_q|to_k|to_v|proj_mlp` (rows stacked in that order). The fused LoRA is exact: its down is the
parts' downs stacked (rank = the sum of their ranks), its up the parts' ups block-diagonal, so
`up @ down` is each part's `up_i @ down_i` in its own rows. A part the LoRA did not train (a single block's
`proj_mlp` under diffusers' default targets) gets zero rows. kohya's clients scale a module by
`alpha / rank`: when every part has the same scale `s = alpha_i / rank_i`, the fused alpha is `s * rank`
(equal ranks r and alphas a over k parts: alpha `a * k`, rank `r * k`); when the scales differ, each
part's scale is folded into its rows of the up weight and alpha = rank (scale 1).

The pairing is diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (loaders/single_file_utils.py,
BFL -> diffusers) read backwards, which ComfyUI's `comfy.utils.flux_to_diffusers` states the other way
round; the fused parts are those sd-scripts' `networks/convert_flux_lora.py` concatenates. The final
layer's `adaLN_modulation.1` holds (shift, scale) where diffusers' `norm_out.linear` holds (scale, shift):
its up rows are swapped. diffusers' own kohya loader (`_convert_kohya_flux_lora_to_diffusers`) ignores the
alpha of the two `final_layer` modules, so their scale is always folded into the up (alpha = rank): every
client then applies them at the same strength. (That loader, in diffusers 0.42.1, also names the modules
outside the blocks without their `transformer.` prefix, so `load_lora_weights` drops them; the default
targets have none. ComfyUI and sd-scripts' `flux_merge_lora.py` apply them.)

The renaming and fusing work on any list of `BflModule`s (`kohya_bfl_names`, `fuse_loras`): FLUX.2's
layout (`flux2_names`) reuses them with its own list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

BFL_PREFIX = "lora_unet_"  # sd-scripts' `LoRANetwork.LORA_PREFIX_FLUX`
# How the trainer's kohya dict names the transformer's modules: diffusers' `convert_state_dict_to_kohya`
# writes the component name ("transformer_"); "lora_unet_" is the same path under kohya's UNet prefix.
TRANSFORMER_PREFIXES = ("transformer_", "lora_unet_")
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
_PEFT_DOWN, _PEFT_UP = ".lora_A.weight", ".lora_B.weight"
_MLP_RATIO = 4.0  # diffusers' FluxSingleTransformerBlock (and BFL's FLUX.1) default; not in the config


@dataclass(frozen=True)
class ModuleLora:
    """One module's LoRA as kohya holds it: the module adds `alpha / rank * up @ down @ x`."""

    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class BflModule:
    """One Linear of BFL's FLUX.1 and the diffusers modules whose outputs it holds, in row order."""

    name: str  # dotted BFL path: "double_blocks.0.img_attn.qkv"
    parts: tuple[str, ...]  # dotted diffusers paths: ("transformer_blocks.0.attn.to_q", …)
    rows: tuple[int | None, ...]  # each part's output rows; None: unfused, the LoRA's own
    swap_halves: bool = False  # BFL's (shift, scale) rows are diffusers' (scale, shift)
    fold_scale: bool = False  # always write alpha = rank, the scale folded into the up

    @property
    def kohya_name(self) -> str:
        return BFL_PREFIX + self.name.replace(".", "_")


def flux_kohya_names(
    kohya_state_dict: Mapping[str, torch.Tensor], transformer_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The trainer's kohya dict with the transformer's modules in sd-scripts' BFL names.

    `kohya_state_dict` is what `convert_state_dict_to_kohya` makes of the LoRA (per module
    `<prefix><module_path_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`, the prefix one
    of `TRANSFORMER_PREFIXES`); keys of other components (`lora_te1_` for CLIP-L, as sd-scripts write it)
    are returned as they are. `transformer_config` is the `FluxTransformer2DModel`'s config. Raises
    ValueError for a module with no BFL counterpart, a key that is not a plain LoRA's, or shapes the
    config contradicts."""
    return kohya_bfl_names(kohya_state_dict, bfl_modules(transformer_config))


def kohya_bfl_names(
    kohya_state_dict: Mapping[str, torch.Tensor], modules: Sequence[BflModule]
) -> dict[str, torch.Tensor]:
    """`flux_kohya_names` for any transformer whose Linears `modules` list: the transformer's keys (one of
    `TRANSFORMER_PREFIXES`) renamed and fused onto the BFL modules, every other key as it is."""
    transformer, others = _split_transformer_keys(kohya_state_dict)
    converted = kohya_flux_state_dict(fuse_loras(_from_kohya(transformer, modules), modules))
    return {**others, **converted}


def kohya_flux_names(
    peft_state: Mapping[str, torch.Tensor], alphas: Mapping[str, float], transformer_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The transformer's peft LoRA (`<module>.lora_A.weight`/`.lora_B.weight`, as
    `get_peft_model_state_dict(transformer)` gives it; `alphas`: module -> kohya alpha, scale = alpha / rank)
    as a kohya dict in sd-scripts' BFL names (`lora_unet_<bfl>.lora_down.weight`, `.lora_up.weight`,
    `.alpha` as a 0-d float tensor). Raises ValueError as `flux_kohya_names` does."""
    return kohya_flux_state_dict(bfl_loras(_from_peft(peft_state, alphas), transformer_config))


def peft_bfl_names(
    peft_state: Mapping[str, torch.Tensor], alphas: Mapping[str, float], modules: Sequence[BflModule]
) -> dict[str, torch.Tensor]:
    """`kohya_flux_names` for any transformer whose Linears `modules` list."""
    return kohya_flux_state_dict(fuse_loras(_from_peft(peft_state, alphas), modules))


def bfl_loras(
    loras: Mapping[str, ModuleLora], transformer_config: Mapping[str, Any]
) -> dict[str, ModuleLora]:
    """diffusers module path -> its LoRA, to BFL module path -> the (fused) LoRA, exactly equivalent."""
    return fuse_loras(loras, bfl_modules(transformer_config))


def fuse_loras(loras: Mapping[str, ModuleLora], modules: Sequence[BflModule]) -> dict[str, ModuleLora]:
    """`bfl_loras` over any list of BFL modules (each diffusers module a part of exactly one)."""
    owners = {part: module for module in modules for part in module.parts}
    unknown = sorted(set(loras) - set(owners))
    if unknown:
        raise ValueError(f"transformer modules with no ComfyUI/sd-scripts name: {unknown[:5]}")
    touched = dict.fromkeys(owners[part] for part in sorted(loras))
    return {module.name: _fuse(module, loras) for module in touched}


def kohya_flux_state_dict(loras: Mapping[str, ModuleLora]) -> dict[str, torch.Tensor]:
    """BFL module path -> LoRA, as kohya keys (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`)."""
    state: dict[str, torch.Tensor] = {}
    for name, lora in loras.items():
        key = BFL_PREFIX + name.replace(".", "_")
        state[key + _DOWN] = lora.down
        state[key + _UP] = lora.up
        state[key + _ALPHA] = torch.tensor(float(lora.alpha))
    return state


def bfl_modules(transformer_config: Mapping[str, Any]) -> list[BflModule]:
    """Every Linear of a diffusers FLUX.1 transformer with this config, grouped by the BFL Linear holding
    it. From diffusers' `convert_flux_transformer_checkpoint_to_diffusers`, read backwards."""
    inner = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    modules = [
        *plain_modules("img_in", "x_embedder"),
        *plain_modules("txt_in", "context_embedder"),
        *embedder_modules("time_in", "time_text_embed.timestep_embedder"),
        *embedder_modules("vector_in", "time_text_embed.text_embedder"),
        BflModule("final_layer.linear", ("proj_out",), (None,), fold_scale=True),
        BflModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), (None,), True, fold_scale=True),
    ]
    if transformer_config.get("guidance_embeds", False):
        modules += embedder_modules("guidance_in", "time_text_embed.guidance_embedder")
    for index in range(int(transformer_config["num_layers"])):
        modules += _double_block(f"double_blocks.{index}.", f"transformer_blocks.{index}.", inner)
    for index in range(int(transformer_config["num_single_layers"])):
        modules += _single_block(f"single_blocks.{index}.", f"single_transformer_blocks.{index}.", inner)
    return modules


def _double_block(bfl: str, diffusers: str, inner: int) -> list[BflModule]:
    qkv = (inner, inner, inner)
    return [
        BflModule(f"{bfl}img_attn.qkv", module_paths(diffusers, "attn.to_q", "attn.to_k", "attn.to_v"), qkv),
        BflModule(
            f"{bfl}txt_attn.qkv",
            module_paths(diffusers, "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            qkv,
        ),
        *plain_modules(f"{bfl}img_attn.proj", f"{diffusers}attn.to_out.0"),
        *plain_modules(f"{bfl}txt_attn.proj", f"{diffusers}attn.to_add_out"),
        *plain_modules(f"{bfl}img_mlp.0", f"{diffusers}ff.net.0.proj"),
        *plain_modules(f"{bfl}img_mlp.2", f"{diffusers}ff.net.2"),
        *plain_modules(f"{bfl}txt_mlp.0", f"{diffusers}ff_context.net.0.proj"),
        *plain_modules(f"{bfl}txt_mlp.2", f"{diffusers}ff_context.net.2"),
        *plain_modules(f"{bfl}img_mod.lin", f"{diffusers}norm1.linear"),
        *plain_modules(f"{bfl}txt_mod.lin", f"{diffusers}norm1_context.linear"),
    ]


def _single_block(bfl: str, diffusers: str, inner: int) -> list[BflModule]:
    parts = module_paths(diffusers, "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    return [
        BflModule(f"{bfl}linear1", parts, (inner, inner, inner, int(inner * _MLP_RATIO))),
        *plain_modules(f"{bfl}linear2", f"{diffusers}proj_out"),
        *plain_modules(f"{bfl}modulation.lin", f"{diffusers}norm.linear"),
    ]


def embedder_modules(bfl: str, diffusers: str) -> list[BflModule]:
    """An MLP embedder: BFL's `<bfl>.in_layer`/`.out_layer` are diffusers' `<diffusers>.linear_1`/`_2`."""
    return [
        *plain_modules(f"{bfl}.in_layer", f"{diffusers}.linear_1"),
        *plain_modules(f"{bfl}.out_layer", f"{diffusers}.linear_2"),
    ]


def plain_modules(bfl: str, diffusers: str) -> list[BflModule]:
    """A Linear both layouts hold whole, under two names."""
    return [BflModule(bfl, (diffusers,), (None,))]


def module_paths(prefix: str, *names: str) -> tuple[str, ...]:
    """`names` under the dotted `prefix` (a block's path)."""
    return tuple(prefix + name for name in names)


def _fuse(module: BflModule, loras: Mapping[str, ModuleLora]) -> ModuleLora:
    """The parts' LoRAs as one on the BFL module: stacked downs, block-diagonal ups, one alpha."""
    present = [(index, loras[part]) for index, part in enumerate(module.parts) if part in loras]
    _check_parts(module, present)
    by_index = dict(present)  # an unfused module's one part is always present
    rows = [int(by_index[i].up.shape[0]) if r is None else r for i, r in enumerate(module.rows)]
    down = torch.cat([lora.down for _, lora in present])
    rank = int(down.shape[0])
    uniform = len({lora.scale for _, lora in present}) == 1 and not module.fold_scale
    dtype = _common_dtype([lora.up for _, lora in present])
    up = torch.zeros((sum(rows), rank), dtype=dtype, device=down.device)
    column = 0
    for index, lora in present:
        row = sum(rows[:index])
        up[row : row + rows[index], column : column + lora.rank] = (
            lora.up if uniform else lora.up * lora.scale
        )
        column += lora.rank
    if module.swap_halves:
        first, second = up.chunk(2, dim=0)
        up = torch.cat([second, first])
    alpha = present[0][1].scale * rank if uniform else float(rank)
    return ModuleLora(down.contiguous(), up, alpha)


def _check_parts(module: BflModule, present: Sequence[tuple[int, ModuleLora]]) -> None:
    inputs = {int(lora.down.shape[1]) for _, lora in present}
    if len(inputs) != 1:
        raise ValueError(f"{module.name}: its parts' LoRAs take inputs of different widths {sorted(inputs)}")
    for index, lora in present:
        expected = module.rows[index]
        if expected is not None and lora.up.shape[0] != expected:
            raise ValueError(
                f"{module.parts[index]}: LoRA up has {lora.up.shape[0]} rows, the config's layout {expected}"
            )
        if lora.up.shape[1] != lora.rank:
            raise ValueError(f"{module.parts[index]}: LoRA up {tuple(lora.up.shape)} and down ranks differ")


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _split_transformer_keys(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(transformer keys without their prefix, every other key as it is)."""
    transformer: dict[str, torch.Tensor] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix = next((p for p in TRANSFORMER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            others[key] = value
        else:
            transformer[key.removeprefix(prefix)] = value
    return transformer, others


def _from_kohya(state: Mapping[str, torch.Tensor], modules: Sequence[BflModule]) -> dict[str, ModuleLora]:
    """kohya keys (`<module_with_underscores>.lora_down.weight`, …, no prefix) -> dotted module -> LoRA."""
    dotted = {part.replace(".", "_"): part for module in modules for part in module.parts}
    names = sorted({key.partition(".")[0] for key in state})
    unknown = [name for name in names if name not in dotted]
    if unknown:
        raise ValueError(f"transformer modules with no ComfyUI/sd-scripts name: {unknown[:5]}")
    _check_keys(state, names, (_DOWN, _UP, _ALPHA))
    return {
        dotted[name]: ModuleLora(state[name + _DOWN], state[name + _UP], float(state[name + _ALPHA].item()))
        for name in names
    }


def _from_peft(peft_state: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> dict[str, ModuleLora]:
    modules = sorted({key.removesuffix(_PEFT_DOWN) for key in peft_state if key.endswith(_PEFT_DOWN)})
    _check_keys(peft_state, modules, (_PEFT_DOWN, _PEFT_UP))
    missing = [module for module in modules if module not in alphas]
    if missing:
        raise ValueError(f"no alpha for LoRA modules {missing[:5]}")
    return {
        module: ModuleLora(
            peft_state[module + _PEFT_DOWN], peft_state[module + _PEFT_UP], float(alphas[module])
        )
        for module in modules
    }


def _check_keys(state: Mapping[str, torch.Tensor], modules: Sequence[str], suffixes: Sequence[str]) -> None:
    """Each module has every suffix and nothing else is there (DoRA scales, biases: not a plain LoRA)."""
    expected = {module + suffix for module in modules for suffix in suffixes}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"not a plain LoRA: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
