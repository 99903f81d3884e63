from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from loraflow_diffusion.tiny import build_tiny_sd, build_tiny_sdxl
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTokenizer

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

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


def test_given_words_when_built_then_each_word_is_one_token(
    tmp_path: Path,
) -> None:
    model = build_tiny_sd(tmp_path / "model", words=("red", "circle", "bl", "blue", "dwjz"))
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextConfig.from_pretrained(model / "text_encoder")

    tokens = tokenizer.tokenize("a red circle, blue dwjz bluee")

    assert tokens == ["a</w>", "red</w>", "circle</w>", ",</w>", "blue</w>", "dwjz</w>", "blu", "e", "e</w>"]
    assert text_encoder.vocab_size == len(tokenizer)  # every merged word has its own embedding row


SDXL_WEIGHT_FILES = [*WEIGHT_FILES, "text_encoder_2/model.safetensors"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


def test_given_same_seed_when_sdxl_built_twice_then_weights_are_identical(
    tmp_path: Path, tiny_sdxl: Path
) -> None:
    again = build_tiny_sdxl(tmp_path / "again")

    for name in SDXL_WEIGHT_FILES:
        first, second = load_file(tiny_sdxl / name), load_file(again / name)
        assert first.keys() == second.keys(), name
        assert all(torch.equal(first[key], second[key]) for key in first), name


def test_given_tiny_sdxl_when_built_then_text_encoders_differ_in_width_and_feed_the_unet(
    tiny_sdxl: Path,
) -> None:
    clip_l = CLIPTextConfig.from_pretrained(tiny_sdxl / "text_encoder")
    big_g = CLIPTextConfig.from_pretrained(tiny_sdxl / "text_encoder_2")
    unet = UNet2DConditionModel.load_config(tiny_sdxl / "unet")

    # diffusers' single-file loader tells SDXL's two encoders apart only by their widths (768 vs 1280).
    assert clip_l.hidden_size != big_g.hidden_size
    assert unet["cross_attention_dim"] == clip_l.hidden_size + big_g.hidden_size
    time_ids = 6 * unet["addition_time_embed_dim"]
    assert unet["projection_class_embeddings_input_dim"] == time_ids + big_g.projection_dim


def test_given_tiny_sdxl_when_saved_then_small(tiny_sdxl: Path) -> None:
    size = sum(path.stat().st_size for path in tiny_sdxl.rglob("*") if path.is_file())

    assert size < 12 * 1024 * 1024
