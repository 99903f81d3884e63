"""The toy world: coloured shapes at a few positions and sizes on plain backgrounds, drawn by code, with
captions that name what is drawn ("a big red circle at the left on white"). Nothing is downloaded.

The base model (`toy_world.base`) is fitted to it; the demo teaches it a shape it never saw (`NEW_SHAPE`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # px, square
Colour = tuple[int, int, int]
COLOURS: dict[str, Colour] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 225),
    "yellow": (235, 205, 30),
}
BACKGROUNDS: dict[str, Colour] = {"white": (240, 240, 235), "black": (20, 20, 28)}
BASE_SHAPES = ("circle", "square", "triangle")
NEW_SHAPE = "plus"  # never in the base's world: what the demo's LoRA teaches it
SHAPES = (*BASE_SHAPES, NEW_SHAPE)
# Where a shape's centre sits, in px.
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (18, 32),
    "right": (46, 32),
    "top": (32, 18),
    "bottom": (32, 46),
    "center": (32, 32),
}
SIZES: dict[str, int] = {"small": 16, "big": 26}  # the shape's side, in px
JITTER = 2  # px each way: drawn scenes vary a little around their anchor
# The words the base's tokenizer keeps whole; a trigger word is none of them.
VOCABULARY = (
    "a", "at", "the", "on", *SIZES, *COLOURS, *BASE_SHAPES, *POSITIONS, *BACKGROUNDS,
)  # fmt: skip


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    size: str
    background: str

    def caption(self, shape_word: str | None = None) -> str:
        """What is drawn, in words; `shape_word` names the shape otherwise (a trigger word)."""
        shape = shape_word or self.shape
        return f"a {self.size} {self.colour} {shape} at the {self.position} on {self.background}"


def all_scenes(shapes: tuple[str, ...] = BASE_SHAPES) -> Iterator[Scene]:
    for colour, shape, position, size, background in itertools.product(
        COLOURS, shapes, POSITIONS, SIZES, BACKGROUNDS
    ):
        yield Scene(colour, shape, position, size, background)


def draw(scene: Scene, offset: tuple[int, int] = (0, 0), colour: Colour | None = None) -> Image.Image:
    """The scene as a `SIZE`x`SIZE` RGB image, its shape moved by `offset` px from its anchor and
    painted in `colour` if given (one the world has no word for)."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    mask = shape_mask(scene.shape, centre_of(scene, offset), SIZES[scene.size])
    image.paste(colour or COLOURS[scene.colour], mask=mask)
    return image


def draw_jittered(scene: Scene, rng: np.random.Generator) -> Image.Image:
    dx, dy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
    return draw(scene, (dx, dy))


def centre_of(scene: Scene, offset: tuple[int, int] = (0, 0)) -> tuple[float, float]:
    x, y = POSITIONS[scene.position]
    return x + offset[0], y + offset[1]


def shape_mask(shape: str, centre: tuple[float, float], side: float) -> Image.Image:
    """A `SIZE`x`SIZE` mode-"L" mask of `shape` centred at `centre`, `side` px across."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    pen = ImageDraw.Draw(mask)
    x, y, h = centre[0], centre[1], side / 2
    box = (x - h, y - h, x + h - 1, y + h - 1)
    if shape == "circle":
        pen.ellipse(box, fill=255)
    elif shape == "square":
        pen.rectangle(box, fill=255)
    elif shape == "triangle":
        pen.polygon([(x, y - h), (x + h - 1, y + h - 1), (x - h, y + h - 1)], fill=255)
    elif shape == "plus":
        arm = side / 6  # arms a third of the side wide
        pen.rectangle((x - arm, y - h, x + arm - 1, y + h - 1), fill=255)
        pen.rectangle((x - h, y - arm, x + h - 1, y + arm - 1), fill=255)
    else:
        raise ValueError(f"the toy world has no shape {shape!r}")
    return mask
