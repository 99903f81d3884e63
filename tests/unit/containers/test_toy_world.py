"""The toy world, its judge and the committed base model fitted to it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loraflow_diffusion.toy_world.base import WEIGHTS_DIR, load_toy_base, untrained_pipeline
from loraflow_diffusion.toy_world.fit import held_out_scenes, training_scenes
from loraflow_diffusion.toy_world.judge import NOTHING, read
from loraflow_diffusion.toy_world.world import (
    BACKGROUNDS,
    NEW_SHAPE,
    SHAPES,
    SIZE,
    Scene,
    all_scenes,
    draw,
    draw_jittered,
)
from PIL import Image

MAX_WEIGHTS_BYTES = 20 * 1024 * 1024
# The fit measured (held-out / seen) colour 0.96 / 1.0, shape 0.90 / 0.96, position 1.0 / 1.0.
MIN_COLOUR_RATE, MIN_SHAPE_RATE, MIN_POSITION_RATE = 0.8, 0.8, 0.8


def test_given_every_scene_drawn_with_jitter_when_read_then_read_as_drawn() -> None:
    rng = np.random.default_rng(0)
    for scene in all_scenes(SHAPES):
        reading = read(draw_jittered(scene, rng))
        assert reading.agrees(scene, "colour", "shape", "position", "size", "background"), (scene, reading)


def test_given_blank_picture_when_read_then_nothing_drawn_on_its_background() -> None:
    reading = read(Image.new("RGB", (SIZE, SIZE), BACKGROUNDS["black"]))

    assert (reading.background, reading.shape, reading.colour) == ("black", NOTHING, NOTHING)


def test_given_caption_with_shape_word_when_written_then_the_word_replaces_the_shape() -> None:
    scene = Scene("green", NEW_SHAPE, "bottom", "big", "white")

    assert scene.caption() == "a big green plus at the bottom on white"
    assert scene.caption("dwjz") == "a big green dwjz at the bottom on white"
    assert draw(scene).size == (SIZE, SIZE)


def test_given_the_fit_when_split_then_the_base_never_sees_new_shape_or_held_out_combinations() -> None:
    seen = {(s.colour, s.shape, s.position) for s in training_scenes()}
    held = {(s.colour, s.shape, s.position) for s in held_out_scenes()}

    assert held and not seen & held
    assert NEW_SHAPE not in {shape for _, shape, _ in seen | held}
    # Every colour, shape and position of a held-out combination is seen in other combinations.
    for colour, shape, position in held:
        assert any(c == colour for c, _, _ in seen) and any(s == shape for _, s, _ in seen)
        assert any(p == position for _, _, p in seen)


def test_given_committed_weights_when_loaded_then_they_match_the_builders_configuration() -> None:
    files = [path for path in WEIGHTS_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= MAX_WEIGHTS_BYTES

    fitted, fresh = load_toy_base(), untrained_pipeline()

    for name in ("unet", "vae", "text_encoder"):
        fitted_part, fresh_part = getattr(fitted, name), getattr(fresh, name)
        fitted_state, fresh_state = fitted_part.state_dict(), fresh_part.state_dict()
        assert {k: v.shape for k, v in fitted_state.items()} == {k: v.shape for k, v in fresh_state.items()}
        assert all(value.dtype == torch.float32 for value in fitted_state.values())  # fp16 on disk, upcast
    assert _public(fitted.unet.config) == _public(fresh.unet.config)
    assert _public(fitted.vae.config, "scaling_factor") == _public(fresh.vae.config, "scaling_factor")
    saved_only = ("dtype", "architectures")  # what saving records of the weights, not the architecture
    assert _public(fitted.text_encoder.config.to_dict(), *saved_only) == _public(
        fresh.text_encoder.config.to_dict(), *saved_only
    )
    assert fitted.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()
    assert type(fitted.scheduler) is type(fresh.scheduler)
    assert _public(fitted.scheduler.config) == _public(fresh.scheduler.config)  # zero SNR, v-prediction
    on_disk = [path for path in files if path.suffix == ".safetensors"]
    assert on_disk and all(_stored_dtypes(path) == {"F16"} for path in on_disk)


def _public(config: Any, *left_out: str) -> dict[str, Any]:
    """A diffusers config as JSON would have it (tuples as lists), without its private `_` keys."""
    plain = json.loads(json.dumps(dict(config)))
    return {k: v for k, v in plain.items() if not k.startswith("_") and k not in left_out}


def _stored_dtypes(path: Path) -> set[str]:
    """The tensor dtypes a safetensors file stores, from its JSON header."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


@pytest.mark.slow
def test_given_committed_base_when_prompted_with_seen_captions_then_draws_colour_shape_and_place() -> None:
    from loraflow_diffusion.toy_world.evaluate import prompt_following

    pipe = load_toy_base()
    pipe.set_progress_bar_config(disable=True)

    rates = prompt_following(pipe, training_scenes()[::15], seeds=(0,))

    assert rates["colour"] >= MIN_COLOUR_RATE and rates["shape"] >= MIN_SHAPE_RATE, rates
    assert rates["position"] >= MIN_POSITION_RATE, rates
