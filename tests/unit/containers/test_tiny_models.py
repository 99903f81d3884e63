"""Every family has a tiny model the local cloud provisions, under one name each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loraflow_diffusion.families import FAMILIES
from loraflow_diffusion.tiny_models import DEFAULT_TINY_MODEL, TINY_MODELS, build_tiny_models
from loraflow_local.base_model import DEFAULT_TINY_MODEL as LOCAL_DEFAULT
from loraflow_shared.families import family_from_model_index

pytestmark = pytest.mark.slow  # builds tiny diffusion models


def test_given_tiny_models_when_built_then_one_per_family_each_recognised_as_its_family(
    tmp_path: Path,
) -> None:
    folders = build_tiny_models(tmp_path)

    assert [folder.name for folder in folders] == list(TINY_MODELS)
    built = {}
    for folder in folders:
        facts = family_from_model_index((folder / "model_index.json").read_text())
        built[folder.name] = None if facts is None else facts.name
    assert built == {name: family for name, (family, _) in TINY_MODELS.items()}
    assert set(built.values()) == {family.name for family in FAMILIES}
    assert DEFAULT_TINY_MODEL == LOCAL_DEFAULT and built[DEFAULT_TINY_MODEL] == "sd15"


def test_given_tiny_models_when_built_twice_then_the_same_weights(tmp_path: Path) -> None:
    first = build_tiny_models(tmp_path / "a")
    second = build_tiny_models(tmp_path / "b")

    for one, two in zip(first, second, strict=True):
        files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
        assert files and files == sorted(p.relative_to(two) for p in two.rglob("*.safetensors"))
        assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files), one.name
        assert json.loads((one / "model_index.json").read_text()) == json.loads(
            (two / "model_index.json").read_text()
        )
