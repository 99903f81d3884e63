"""Every family's tiny pipeline under one name each, as the local cloud provisions them at
`s3://<ArtifactsBucket>/base-models/<name>/` (README, "Model families"): a laptop trains every family.

`toy-world` (SD 1.5-shaped, fitted to the toy world and committed: `loraflow_diffusion.toy_world`) is the
local cloud's default base model; the others have random weights and are named after their family.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loraflow_diffusion.tiny import build_tiny_sd, build_tiny_sdxl
from loraflow_diffusion.tiny_families import (
    build_tiny_flux1,
    build_tiny_flux2_klein,
    build_tiny_qwen_image,
    build_tiny_z_image,
)
from loraflow_diffusion.toy_world.base import TOY_BASE_NAME, copy_toy_base

DEFAULT_TINY_MODEL = TOY_BASE_NAME
# name -> (the family it is, its builder: folder -> folder, same weights every time)
TINY_MODELS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    DEFAULT_TINY_MODEL: ("sd15", copy_toy_base),
    "tiny-sd": ("sd15", build_tiny_sd),
    "tiny-sdxl": ("sdxl", build_tiny_sdxl),
    "tiny-flux1": ("flux1", build_tiny_flux1),
    "tiny-flux2_klein": ("flux2_klein", build_tiny_flux2_klein),
    "tiny-qwen_image": ("qwen_image", build_tiny_qwen_image),
    "tiny-z_image": ("z_image", build_tiny_z_image),
}


def build_tiny_models(folder: Path) -> list[Path]:
    """Build every tiny model into `folder/<name>/`; return their folders."""
    return [build(folder / name) for name, (_, build) in TINY_MODELS.items()]
