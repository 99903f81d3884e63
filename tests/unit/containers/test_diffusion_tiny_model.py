from __future__ import annotations

from pathlib import Path

import pytest
from loraflow_diffusion.tiny import build_tiny_sd
from safetensors.torch import load_file
from transformers import CLIPTokenizer

WEIGHT_FILES = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]


def _weights(model: Path) -> dict[str, dict]:
    return {name: load_file(model / name) for name in WEIGHT_FILES}


def test_given_same_seed_when_built_twice_then_weights_are_identical(
    tmp_path: Path, tiny_model: Path
) -> None:
    again = build_tiny_sd(tmp_path / "again")

    first, second = _weights(tiny_model), _weights(again)

    for name in WEIGHT_FILES:
        assert first[name].keys() == second[name].keys()
        assert all((first[name][key] == second[name][key]).all() for key in first[name]), name


def test_given_another_seed_when_built_then_weights_differ(tmp_path: Path, tiny_model: Path) -> None:
    other = build_tiny_sd(tmp_path / "other", seed=1)

    unet, other_unet = _weights(tiny_model)[WEIGHT_FILES[0]], _weights(other)[WEIGHT_FILES[0]]

    assert any(not (unet[key] == other_unet[key]).all() for key in unet)


def test_given_tiny_model_when_saved_then_small(tiny_model: Path) -> None:
    size = sum(path.stat().st_size for path in tiny_model.rglob("*") if path.is_file())

    assert size < 12 * 1024 * 1024


@pytest.mark.parametrize("prompt", ["ohwx", "sks dog, 2 cats!", "zqxj_v2 (portrait)"])
def test_given_trigger_word_when_tokenized_then_round_trips_without_unknown_tokens(
    tiny_model: Path, prompt: str
) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")

    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length).input_ids

    assert len(ids) == 77
    # No merges: one token per character. An unknown character would become <|endoftext|> (CLIP's
    # unk token) and end the prompt early.
    body = ids[1 : ids.index(tokenizer.eos_token_id)]
    assert len(body) == len(prompt.replace(" ", ""))
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == prompt.replace(" ", "")
