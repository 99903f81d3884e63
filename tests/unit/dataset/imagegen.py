"""Deterministic test images made by code: noise, gradients and shapes, plus crafted headers."""

import struct
import zlib
from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: gradients, noise and a few shapes, so encoders behave realistically."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [xs / max(width - 1, 1), ys / max(height - 1, 1), (xs + ys) / max(width + height - 2, 1)], axis=-1
    )
    pixels = base * 200 + rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(1, width)), y0 + int(rng.integers(1, height))
        color = tuple(int(value) for value in rng.integers(0, 256, size=3))
        draw.ellipse((x0, y0, x1, y1), fill=color)
    return image


def encode(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def image_bytes(
    image_format: str, width: int = 96, height: int = 96, seed: int = 0, **options: object
) -> bytes:
    return encode(noise_image(width, height, seed), image_format, **options)


def _png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(chunk_type + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", crc)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A well-formed PNG whose IHDR declares any size, with one tiny IDAT: never allocates pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_with_big_icc(icc_bytes: int, width: int = 96, height: int = 96, seed: int = 0) -> bytes:
    """A JPEG whose ICC profile (APP2 segments before the frame header) is ``icc_bytes`` long."""
    profile = np.random.default_rng(seed).integers(0, 256, size=icc_bytes, dtype=np.uint8).tobytes()
    return encode(noise_image(width, height, seed), "JPEG", icc_profile=profile)
