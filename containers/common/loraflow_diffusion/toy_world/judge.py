"""Reads a toy-world picture back into words: background, colour, shape, position and size.

A fixed, explainable reader rather than a trained classifier: the background is the border's colour, the
shape is every pixel far from it, its colour the nearest palette colour, its position and size the nearest
anchor and side, and its kind the shape whose ideal mask overlaps it best (intersection over union).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from loraflow_diffusion.toy_world.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    shape_mask,
)

FOREGROUND_DISTANCE = 80.0  # RGB distance from the background that counts as drawn (palette: 165 or more)
MIN_SHAPE_PIXELS = 40  # fewer drawn pixels than this is "nothing drawn" (a small triangle has ~130)
NOTHING = "nothing"


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str = NOTHING
    shape: str = NOTHING
    position: str = NOTHING
    size: str = NOTHING
    overlap: float = 0.0  # the best shape mask's intersection over union with the drawn pixels

    def agrees(self, scene: Scene, *fields: str) -> bool:
        """Whether the picture shows `scene`'s value of every one of `fields`."""
        return all(getattr(self, field) == getattr(scene, field) for field in fields)


def read(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = _nearest(_border_colour(pixels), BACKGROUNDS)
    drawn = np.linalg.norm(pixels - np.array(BACKGROUNDS[background]), axis=-1) > FOREGROUND_DISTANCE
    if drawn.sum() < MIN_SHAPE_PIXELS:
        return Reading(background)
    colour = _nearest(np.median(pixels[drawn], axis=0), COLOURS)
    ys, xs = np.nonzero(drawn)
    left, right = np.percentile(xs, [2, 98])
    top, bottom = np.percentile(ys, [2, 98])
    centre = ((left + right + 1) / 2, (top + bottom + 1) / 2)
    side = max(right - left, bottom - top) + 1
    overlaps = {shape: _iou(drawn, shape, centre, side) for shape in SHAPES}
    shape = max(overlaps, key=lambda name: overlaps[name])
    return Reading(
        background=background,
        colour=colour,
        shape=shape,
        position=_nearest(np.array(centre), POSITIONS),
        size=min(SIZES, key=lambda name: abs(SIZES[name] - side)),
        overlap=overlaps[shape],
    )


def _border_colour(pixels: np.ndarray) -> np.ndarray:
    ring = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)])
    ring = np.concatenate([ring, pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def _nearest(value: np.ndarray, table: Mapping[str, tuple[int, ...]]) -> str:
    return min(table, key=lambda name: float(np.linalg.norm(value - np.array(table[name]))))


def _iou(drawn: np.ndarray, shape: str, centre: tuple[float, float], side: float) -> float:
    ideal = np.asarray(shape_mask(shape, centre, side)) > 127
    union = np.logical_or(drawn, ideal).sum()
    return float(np.logical_and(drawn, ideal).sum() / union) if union else 0.0
