"""What the trainer sees of each kind of image: upright 8-bit RGB, whatever the PNG, JPEG or WebP stores.

Each image is made in memory, written into a dataset folder, and read back through `TrainingData.pixels`
at its own size (no resize), so the asserted values are the trainer's input itself.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.dataset.images import TAIL_BYTES, inspect_image
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_training.data import TrainingData, load_training_data
from loraflow_training.pixels import BACKGROUND, CONVERTED_MODES, to_training_rgb
from PIL import Image

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

SIDE = 64
WHITE = np.array(BACKGROUND, dtype=np.uint8)


def trainer_input(
    tmp_path: Path, data: bytes, name: str = "a.png", size: tuple[int, int] = (SIDE, SIDE)
) -> np.ndarray:
    """The uint8 `[height, width, 3]` the trainer feeds the VAE for a dataset holding only this image."""
    data_for(tmp_path, data, name)
    training = load(tmp_path, size)
    assert training.samples[0].bucket == size
    return training.pixels(0).permute(1, 2, 0).numpy()


def data_for(root: Path, data: bytes, name: str) -> None:
    folder = root / "1_ohwx"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def load(root: Path, size: tuple[int, int]) -> TrainingData:
    return load_training_data(root, TrainingConfig(resolution=size))


def saved(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def accepted_by_validation(data: bytes) -> None:
    info = inspect_image(data, data[-TAIL_BYTES:], len(data), "1_ohwx/a")
    assert (info.width, info.height) != (0, 0)


# --- PNG written byte by byte: every colour type and bit depth the format has


def png(
    samples: np.ndarray, bit_depth: int, color_type: int, palette: bytes = b"", trns: bytes = b""
) -> bytes:
    """A PNG of `samples` (`[height, width, channels]` integers below 2**bit_depth), filter 0 rows."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + _packed(row, bit_depth) for row in samples.reshape(height, -1))
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))]
    chunks += [(b"PLTE", palette)] if palette else []
    chunks += [(b"tRNS", trns)] if trns else []
    chunks += [(b"IDAT", zlib.compress(rows)), (b"IEND", b"")]
    body = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        for kind, data in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


def _packed(row: np.ndarray, bit_depth: int) -> bytes:
    if bit_depth == 16:
        return row.astype(">u2").tobytes()
    if bit_depth == 8:
        return row.astype(np.uint8).tobytes()
    bits = (row[:, None].astype(np.int64) >> np.arange(bit_depth - 1, -1, -1)) & 1
    return np.packbits(bits.reshape(-1).astype(np.uint8)).tobytes()


def ramp(bit_depth: int) -> np.ndarray:
    """`[SIDE, SIDE]` values rising left to right from 0 to the largest of `bit_depth` bits."""
    top = 2**bit_depth - 1
    return np.tile(np.arange(SIDE) * top // (SIDE - 1), (SIDE, 1))


def to_eight_bits(values: np.ndarray, bit_depth: int) -> np.ndarray:
    """What an n-bit sample means in 8 bits: scaled up below 8 bits, the high byte at 16."""
    return (values >> 8 if bit_depth == 16 else values * 255 // (2**bit_depth - 1)).astype(np.uint8)


PALETTE = np.array([[(i * 37) % 256, (i * 91) % 256, (i * 151) % 256] for i in range(256)], dtype=np.uint8)


def grey_case(bit_depth: int) -> tuple[bytes, np.ndarray]:
    values = ramp(bit_depth)
    return png(values[..., None], bit_depth, 0), np.repeat(
        to_eight_bits(values, bit_depth)[..., None], 3, axis=2
    )


def rgb_case(bit_depth: int, color_type: int = 2) -> tuple[bytes, np.ndarray]:
    top, values = 2**bit_depth - 1, ramp(bit_depth)
    channels = [values, top - values, values // 2]
    stored = channels + ([np.full_like(values, top)] if color_type == 6 else [])
    expected = np.stack([to_eight_bits(channel, bit_depth) for channel in channels], axis=-1)
    return png(np.stack(stored, axis=-1), bit_depth, color_type), expected


def grey_alpha_case(bit_depth: int) -> tuple[bytes, np.ndarray]:
    values = ramp(bit_depth)
    stored = np.stack([values, np.full_like(values, 2**bit_depth - 1)], axis=-1)
    return png(stored, bit_depth, 4), np.repeat(to_eight_bits(values, bit_depth)[..., None], 3, axis=2)


def palette_case(bit_depth: int) -> tuple[bytes, np.ndarray]:
    indices = np.tile(np.arange(SIDE) % 2**bit_depth, (SIDE, 1))
    colours = PALETTE[: 2**bit_depth]
    return png(indices[..., None], bit_depth, 3, palette=colours.tobytes()), colours[indices]


PNG_CASES: dict[str, Callable[[], tuple[bytes, np.ndarray]]] = {
    **{f"grey-{depth}bit": partial(grey_case, depth) for depth in (1, 2, 4, 8, 16)},
    **{f"rgb-{depth}bit": partial(rgb_case, depth) for depth in (8, 16)},
    **{f"palette-{depth}bit": partial(palette_case, depth) for depth in (1, 2, 4, 8)},
    **{f"grey-alpha-{depth}bit": partial(grey_alpha_case, depth) for depth in (8, 16)},
    **{f"rgba-{depth}bit": partial(rgb_case, depth, color_type=6) for depth in (8, 16)},
}


@pytest.mark.parametrize("case", PNG_CASES)
def test_given_png_of_each_colour_type_and_bit_depth_when_validated_and_trained_then_exact_8bit_rgb(
    tmp_path: Path, case: str
) -> None:
    data, expected = PNG_CASES[case]()
    accepted_by_validation(data)

    pixels = trainer_input(tmp_path, data)

    assert pixels.dtype == np.uint8
    assert np.array_equal(pixels, expected)


# --- 16-bit


def test_given_16bit_grey_gradient_png_when_trained_then_maps_monotonically_onto_0_to_255(
    tmp_path: Path,
) -> None:
    values = (
        np.arange(SIDE * SIDE, dtype=np.uint32).reshape(SIDE, SIDE) * 65535 // (SIDE * SIDE - 1)
    ).astype(np.uint16)
    data = saved(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[..., 0]
    assert (clipped == 255).mean() > 0.99  # why a plain convert("RGB") is not enough: it clips, not scales

    pixels = trainer_input(tmp_path, data)

    grey = pixels[..., 0].reshape(-1)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    assert (np.diff(grey.astype(int)) >= 0).all()
    assert (grey[0], grey[-1]) == (0, 255)
    assert len(np.unique(grey)) == 256
    assert np.array_equal(pixels[..., 0], (values >> 8).astype(np.uint8))


def test_given_16bit_grey_png_with_colour_key_when_trained_then_keyed_pixels_are_background(
    tmp_path: Path,
) -> None:
    values = np.full((SIDE, SIDE), 30_000, dtype=np.uint16)
    values[:, : SIDE // 2] = 1234
    data = png(values[..., None], 16, 0, trns=struct.pack(">H", 1234))

    pixels = trainer_input(tmp_path, data)

    assert (pixels[:, : SIDE // 2] == WHITE).all()
    assert (pixels[:, SIDE // 2 :] == 30_000 >> 8).all()


# --- transparency: composited over white


def test_given_rgba_with_transparent_and_half_transparent_regions_when_trained_then_over_white(
    tmp_path: Path,
) -> None:
    rgba = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    rgba[:, :, :3] = np.random.default_rng(0).integers(0, 256, size=(SIDE, SIDE, 3))  # invisible garbage
    rgba[:, 32:48] = (200, 0, 0, 255)  # opaque red
    rgba[:, 48:] = (0, 0, 200, 128)  # blue at about half opacity

    pixels = trainer_input(tmp_path, saved(Image.fromarray(rgba, "RGBA")))

    assert (pixels[:, :32] == WHITE).all()
    assert (pixels[:, 32:48] == (200, 0, 0)).all()
    expected_half = np.array([127, 127, 227])  # 255 * (1 - 128/255) + channel * 128/255
    assert (np.abs(pixels[:, 48:].astype(int) - expected_half) <= 1).all()


def test_given_palette_png_with_transparency_when_trained_then_alpha_of_each_entry_applied(
    tmp_path: Path,
) -> None:
    indices = np.tile(np.arange(SIDE) % 3, (SIDE, 1))
    palette = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255])  # red, green, blue
    data = png(indices[..., None], 8, 3, palette=palette, trns=bytes([0, 255, 128]))
    assert Image.open(io.BytesIO(data)).mode == "P"

    pixels = trainer_input(tmp_path, data)

    assert (pixels[indices == 0] == WHITE).all()
    assert (pixels[indices == 1] == (0, 255, 0)).all()
    assert (np.abs(pixels[indices == 2].astype(int) - (127, 127, 255)) <= 1).all()


def test_given_grey_alpha_png_when_trained_then_transparent_is_white_and_opaque_keeps_its_grey(
    tmp_path: Path,
) -> None:
    grey_alpha = np.full((SIDE, SIDE, 2), (50, 255), dtype=np.uint8)
    grey_alpha[: SIDE // 2, :, 1] = 0

    pixels = trainer_input(tmp_path, saved(Image.fromarray(grey_alpha, "LA")))

    assert (pixels[: SIDE // 2] == WHITE).all()
    assert (pixels[SIDE // 2 :] == 50).all()


# --- colour models


def test_given_cmyk_jpeg_when_trained_then_rgb_from_inverted_ink_and_black(tmp_path: Path) -> None:
    cyan, magenta, yellow, black = 100, 50, 200, 60
    data = saved(Image.new("CMYK", (SIDE, SIDE), (cyan, magenta, yellow, black)), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    accepted_by_validation(data)

    pixels = trainer_input(tmp_path, data, "a.jpg")

    expected = [(255 - ink) * (255 - black) / 255 for ink in (cyan, magenta, yellow)]
    assert (np.abs(pixels.astype(float) - expected) <= 2).all()


@pytest.mark.parametrize("mode", ["L", "1"])
def test_given_grey_or_bilevel_png_when_trained_then_equal_rgb_channels(tmp_path: Path, mode: str) -> None:
    values = np.tile(np.arange(SIDE, dtype=np.uint8) * 4, (SIDE, 1))
    if mode == "1":
        values = np.where((np.indices((SIDE, SIDE)).sum(axis=0) % 2) == 0, 255, 0).astype(np.uint8)
    image = Image.fromarray(values).convert(mode)

    pixels = trainer_input(tmp_path, saved(image))

    assert np.array_equal(pixels, np.repeat(values[..., None], 3, axis=2))


# --- orientation


def stored_with_marker(width: int, height: int) -> np.ndarray:
    """Blue, with a red 16x16 block at the stored image's top-left corner."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = (0, 0, 255)
    pixels[:16, :16] = (255, 0, 0)
    return pixels


def test_given_jpeg_with_exif_orientation_6_when_trained_then_sides_swap_and_top_left_turns_to_top_right(
    tmp_path: Path,
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 96x64; shown turned 90 degrees clockwise: 64 wide, 96 high
    data = saved(Image.fromarray(stored_with_marker(96, 64)), "JPEG", exif=exif, quality=95)

    pixels = trainer_input(tmp_path, data, "a.jpg", size=(64, 96))

    assert pixels.shape == (96, 64, 3)
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    assert (np.abs(pixels[2:14, 50:62].astype(int) - red) < 40).all()  # top right: the stored top-left
    assert (np.abs(pixels[2:14, 2:14].astype(int) - blue) < 40).all()
    assert (np.abs(pixels[-14:-2, 50:62].astype(int) - blue) < 40).all()


ORIENTED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", ORIENTED)
def test_given_png_with_each_exif_orientation_when_trained_then_bucket_and_pixels_upright(
    tmp_path: Path, orientation: int
) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright = ORIENTED[orientation](stored)
    height, width = upright.shape[:2]

    pixels = trainer_input(tmp_path, saved(Image.fromarray(stored), exif=exif), size=(width, height))

    assert np.array_equal(pixels, upright)


# --- animation: the first frame


@pytest.mark.parametrize(("image_format", "name"), [("WEBP", "a.webp"), ("PNG", "a.png")])
def test_given_animated_image_when_trained_then_first_frame(
    tmp_path: Path, image_format: str, name: str
) -> None:
    red, blue = Image.new("RGB", (SIDE, SIDE), (255, 0, 0)), Image.new("RGB", (SIDE, SIDE), (0, 0, 255))
    data = saved(red, image_format, save_all=True, append_images=[blue], lossless=True, duration=100)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    accepted_by_validation(data)

    pixels = trainer_input(tmp_path, data, name)

    assert (pixels == (255, 0, 0)).all()


# --- the converter's contract


@pytest.mark.parametrize("mode", sorted(CONVERTED_MODES))
def test_given_each_converted_mode_when_converted_then_rgb_8bit(mode: str) -> None:
    converted = to_training_rgb(Image.new(mode, (3, 2)), "1_ohwx/a.png")

    assert (converted.mode, converted.size) == ("RGB", (3, 2))


def test_given_mode_without_a_rule_when_converted_then_unsupported_format_with_its_path() -> None:
    with pytest.raises(LoraflowError) as caught:
        to_training_rgb(Image.new("F", (4, 4)), "1_ohwx/a.png")

    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT
    assert caught.value.path == "1_ohwx/a.png"
    assert "pixel mode F" in caught.value.message


def test_given_gif_named_png_when_loaded_then_unreadable_image_not_decoded_as_gif(tmp_path: Path) -> None:
    data_for(tmp_path, saved(Image.new("RGB", (SIDE, SIDE)), "GIF"), "a.png")

    with pytest.raises(LoraflowError) as caught:
        load(tmp_path, (SIDE, SIDE))

    assert caught.value.code is ErrorCode.UNREADABLE_IMAGE
    assert caught.value.path == "1_ohwx/a.png"


def test_given_pixels_when_read_then_tensor_layout_is_channels_first_uint8(tmp_path: Path) -> None:
    data_for(tmp_path, saved(Image.new("LA", (SIDE, 2 * SIDE), (10, 255))), "a.png")

    tensor = load(tmp_path, (SIDE, 2 * SIDE)).pixels(0)

    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (3, 2 * SIDE, SIDE)
