"""Image checks from a file's first and last bytes only: format, size, truncation.

Validation never downloads or decodes whole images: the format comes from magic bytes, the
dimensions from the header (Pillow parses PNG and JPEG headers lazily; WebP's fixed-offset header is
read here because Pillow's WebP plugin needs the whole file), truncation from the tail.
"""

import struct
from io import BytesIO
from typing import Literal

from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError
from pydantic import BaseModel

from loraflow_shared.dataset.layout import SUPPORTED_FORMATS
from loraflow_shared.errors import ErrorCode, LoraflowError

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 1024
MAX_HEAD_BYTES = 1024 * 1024  # JPEG APPn segments (EXIF, ICC, XMP) can push the size past HEAD_BYTES
DEFAULT_MIN_SIDE = 64
DEFAULT_MAX_PIXELS = 4096 * 4096

ImageFormat = Literal["PNG", "JPEG", "WEBP"]  # the keys of layout.FORMAT_EXTENSIONS
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # zero length, type, CRC
_JPEG_MAGIC = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
# JPEG frame headers (SOFn), ITU T.81 B.1.1.3. Pillow refuses precisions other than 8 bits and channel
# counts other than 1, 3 and 4 at the header; libjpeg-turbo, which decodes for Pillow, refuses the
# hierarchical (differential) processes when decoding. Every other mode Pillow reports for PNG
# (1, L, I;16, P, RGB, LA, RGBA) and JPEG (L, RGB, CMYK) the trainer converts to RGB.
_JPEG_FRAME_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC})  # not DHT, JPG, DAC
_JPEG_DIFFERENTIAL_MARKERS = frozenset({0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF})
_JPEG_MARKERS_WITHOUT_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI
_JPEG_START_OF_SCAN = 0xDA
# Pillow's header parsers raise these on malformed or short input (Image.open catches the same set).
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, IndexError, TypeError, EOFError, struct.error)


class ImageInfo(BaseModel):
    format: ImageFormat
    width: int
    height: int


class NeedMoreBytes(Exception):
    """The header runs past the bytes given: call again with the first ``wanted`` bytes."""

    def __init__(self, wanted: int) -> None:
        super().__init__(f"image header needs the first {wanted} bytes")
        self.wanted = wanted


def inspect_image(
    head: bytes,
    tail: bytes,
    size: int,
    path: str,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageInfo:
    """Check an image from its first bytes (``head``) and last bytes (``tail``) of ``size`` total.

    Raises LoraflowError (UNSUPPORTED_FORMAT, UNREADABLE_IMAGE, IMAGE_TOO_LARGE, IMAGE_TOO_SMALL)
    or NeedMoreBytes when the header is longer than ``head``.
    """
    image_format = sniff_format(head)
    if image_format is None:
        raise LoraflowError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"{describe_content(head, size)}; supported formats are {SUPPORTED_FORMATS}",
            path,
        )
    if image_format == "WEBP":
        width, height = _webp_dimensions(head, path)
    else:
        if image_format == "JPEG":
            _check_jpeg_process(head, path)
        width, height = _pillow_dimensions(image_format, head, size, path)
    _check_complete(image_format, head, tail, size, path)
    if width * height > max_pixels:
        raise LoraflowError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} ({width * height} pixels), the limit is {max_pixels} pixels",
            path,
        )
    if min(width, height) < min_side:
        raise LoraflowError(
            ErrorCode.IMAGE_TOO_SMALL,
            f"image is {width}x{height}, each side must be at least {min_side} pixels",
            path,
        )
    return ImageInfo(format=image_format, width=width, height=height)


def sniff_format(head: bytes) -> ImageFormat | None:
    """The supported format the content is in, judged by magic bytes only."""
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head.startswith(_JPEG_MAGIC):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def describe_content(head: bytes, size: int) -> str:
    """Say what an unsupported file looks like ("a GIF image", "text", ...)."""
    if size == 0 or not head:
        return "file is empty"
    try:
        with Image.open(BytesIO(head)) as image:  # identifies only; never decodes pixels
            return f"file is a {image.format} image"
    except (UnidentifiedImageError, Image.DecompressionBombError, *_HEADER_ERRORS):
        pass
    try:
        head[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "file is not an image (unrecognised binary data)"
    return "file is not an image (it looks like text)"


def _pillow_dimensions(image_format: ImageFormat, head: bytes, size: int, path: str) -> tuple[int, int]:
    # The plugin classes parse the header without Image.open's decompression-bomb check, so a huge
    # image still reports its real dimensions; the pixel limit is applied by the caller.
    plugin = PngImagePlugin.PngImageFile if image_format == "PNG" else JpegImagePlugin.JpegImageFile
    try:
        with plugin(BytesIO(head)) as image:
            return image.size
    except _HEADER_ERRORS as exc:
        if len(head) < min(size, MAX_HEAD_BYTES):
            raise NeedMoreBytes(min(size, MAX_HEAD_BYTES, max(4 * len(head), HEAD_BYTES))) from exc
        reason = f"corrupt header ({exc})"
        if len(head) >= MAX_HEAD_BYTES:
            reason = f"corrupt header, or a header longer than {MAX_HEAD_BYTES} bytes ({exc})"
        raise LoraflowError(ErrorCode.UNREADABLE_IMAGE, f"unreadable {image_format}: {reason}", path) from exc


def _check_jpeg_process(head: bytes, path: str) -> None:
    process = _unreadable_jpeg_process(head)
    if process:
        message = (
            f"{process}; loraflow reads 8-bit JPEG with 1 (grey), 3 (colour) or 4 (CMYK) channels: "
            "save it as such a JPEG or as PNG"
        )
        raise LoraflowError(ErrorCode.UNSUPPORTED_FORMAT, message, path)


def _unreadable_jpeg_process(head: bytes) -> str | None:
    """What makes the JPEG's frame unreadable for Pillow, if its frame header is in ``head``."""
    frame = _jpeg_frame(head)
    if frame is None:
        return None  # not within head (Pillow then asks for more) or corrupt (Pillow says so)
    marker, precision, channels = frame
    if marker in _JPEG_DIFFERENTIAL_MARKERS:
        return "hierarchical (differential) JPEG"
    if precision != 8:
        return f"{precision}-bit JPEG"
    if channels not in (1, 3, 4):
        return f"JPEG with {channels} channels"
    return None


def _jpeg_frame(head: bytes) -> tuple[int, int, int] | None:
    """(marker, sample precision, channels) of the first frame header, walking the segments after SOI."""
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _JPEG_MARKERS_WITHOUT_LENGTH:
            pos += 2
        elif marker in _JPEG_FRAME_MARKERS:
            return (marker, head[pos + 4], head[pos + 9]) if pos + 10 <= len(head) else None
        elif marker == _JPEG_START_OF_SCAN:
            return None
        else:
            pos += 2 + int.from_bytes(head[pos + 2 : pos + 4], "big")
    return None


def _webp_dimensions(head: bytes, path: str) -> tuple[int, int]:
    """Canvas size from the first chunk (RFC 9649): VP8X, VP8L (lossless) or VP8 (lossy)."""
    chunk = head[12:16]
    try:
        if chunk == b"VP8X":
            width = int.from_bytes(head[24:27], "little") + 1
            height = int.from_bytes(head[27:30], "little") + 1
            if len(head) >= 30:
                return width, height
        elif chunk == b"VP8L" and head[20:21] == b"\x2f":
            (bits,) = struct.unpack("<I", head[21:25])
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", head[26:30])
            return width & 0x3FFF, height & 0x3FFF
    except struct.error:
        pass
    raise LoraflowError(ErrorCode.UNREADABLE_IMAGE, "unreadable WEBP: corrupt or truncated header", path)


def _check_complete(image_format: ImageFormat, head: bytes, tail: bytes, size: int, path: str) -> None:
    """Truncated uploads are the common failure: check each format's end marker."""
    if image_format == "PNG" and _PNG_IEND not in tail:
        reason = "no IEND chunk in the last bytes"
    elif image_format == "JPEG" and _JPEG_EOI not in tail:
        reason = "no end-of-image marker (FFD9) in the last bytes"
    elif image_format == "WEBP" and (declared := _riff_size(head) + 8) != size:
        what = "truncated WEBP" if size < declared else "WEBP with trailing data"
        reason = f"the RIFF header declares {declared} bytes but the file has {size}"
        raise LoraflowError(ErrorCode.UNREADABLE_IMAGE, f"{what}: {reason}", path)
    else:
        return
    raise LoraflowError(ErrorCode.UNREADABLE_IMAGE, f"truncated {image_format}: {reason}", path)


def _riff_size(head: bytes) -> int:
    return int(struct.unpack("<I", head[4:8])[0])
