"""A decoded PNG, JPEG or WebP as the trainer's input: upright 8-bit RGB, whatever the file stores.

Validation (`loraflow_shared.dataset.images`) accepts only what this converts; the tests convert every
PNG colour type and bit depth, grey/colour/CMYK JPEG and RGB/RGBA WebP. What each source becomes:

- Orientation: the EXIF (or XMP) Orientation tag is applied (`ImageOps.exif_transpose`, as diffusers'
  training scripts do; kohya ignores it). `oriented_size` gives the upright size from the header, so an
  image's bucket is chosen for the shape it is trained at.
- Frames: an animated PNG or WebP trains on its first frame (for APNG, the still image that viewers
  without animation show).
- Bit depth: 16-bit grey PNGs (Pillow modes `I;16*`, `I`) keep their high byte, which is what Pillow
  does for 16-bit colour PNGs; Pillow's plain `convert("RGB")` would clip every value above 255 to white.
  1-, 2- and 4-bit grey and palettes are scaled by Pillow (0..2^n-1 onto 0..255).
- Colour: grey (`1`, `L`) becomes R = G = B; palettes are looked up; CMYK JPEG (Adobe YCCK is decoded to
  CMYK by libjpeg) uses Pillow's R = (255 - C)(255 - K) / 255. Embedded ICC profiles are not applied:
  pixel values are taken as sRGB, as kohya and diffusers take them.
- Transparency (an alpha channel, a palette's alpha or a colour key): composited over white. The colour
  of a fully transparent pixel is undefined (often black, or left over from editing), so dropping alpha,
  which is what kohya's and diffusers' `convert("RGB")` does, trains on colours nobody sees; white is the
  usual backdrop of the cut-out subjects transparent images hold (products, characters, stickers).
"""

from __future__ import annotations

import numpy as np
from loraflow_shared.errors import ErrorCode, LoraflowError
from PIL import ExifTags, Image, ImageOps

BACKGROUND = (255, 255, 255)  # what transparent pixels become
_SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image by 90 degrees
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr"}) | _ALPHA_MODES
CONVERTED_MODES = _SIXTEEN_BIT_MODES | _EIGHT_BIT_MODES


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied: what `to_training_rgb` returns."""
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in _SWAPPED_ORIENTATIONS else (width, height)


def to_training_rgb(image: Image.Image, rel_path: str) -> Image.Image:
    """The image's (first frame's) pixels, upright, as 8-bit RGB with transparency over `BACKGROUND`.

    Decodes `image` if it is not loaded yet. Raises UNSUPPORTED_FORMAT for a mode it has no rule for.
    """
    upright = ImageOps.exif_transpose(image)
    if upright.mode in _SIXTEEN_BIT_MODES:
        upright = _high_byte(upright)
    if upright.mode not in _EIGHT_BIT_MODES:
        supported = ", ".join(sorted(CONVERTED_MODES))
        message = f"pixel mode {upright.mode} has no conversion to RGB (converted: {supported})"
        raise LoraflowError(ErrorCode.UNSUPPORTED_FORMAT, message, rel_path)
    if upright.mode in _ALPHA_MODES or "transparency" in upright.info:
        return _over_background(upright.convert("RGBA"))
    return upright.convert("RGB")


def _high_byte(image: Image.Image) -> Image.Image:
    """16-bit grey as 8-bit grey (value >> 8); a PNG colour key (tRNS) becomes an alpha channel (`LA`)."""
    values = np.asarray(image).astype(np.int64)  # numpy reads Pillow's byte order (I;16B is big-endian)
    grey = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return grey
    alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def _over_background(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
