import struct

import pytest
from imagegen import encode, image_bytes, jpeg_with_big_icc, noise_image, png_with_declared_size
from loraflow_shared.dataset.images import (
    HEAD_BYTES,
    MAX_HEAD_BYTES,
    TAIL_BYTES,
    ImageInfo,
    NeedMoreBytes,
    inspect_image,
)
from loraflow_shared.errors import ErrorCode, LoraflowError

PATH = "60_dwjz/img1.png"


def inspect(data: bytes, head_bytes: int = HEAD_BYTES, **limits: int) -> ImageInfo:
    """Inspect the way the validator does: first ``head_bytes`` and last TAIL_BYTES only."""
    return inspect_image(data[:head_bytes], data[-TAIL_BYTES:], len(data), PATH, **limits)


def rejected(data: bytes, **limits: int) -> LoraflowError:
    with pytest.raises(LoraflowError) as caught:
        inspect(data, **limits)
    assert caught.value.path == PATH
    return caught.value


@pytest.mark.parametrize(
    ("image_format", "options"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 90}),
        ("WEBP", {"quality": 100}),
        ("WEBP", {"lossless": True, "method": 0}),
        ("WEBP", {"quality": 100, "exif": b"Exif\x00\x00" + bytes(64)}),  # extended (VP8X) header
    ],
)
def test_given_large_image_when_inspected_from_head_and_tail_then_format_and_size(
    image_format: str, options: dict[str, object]
) -> None:
    data = image_bytes(image_format, 640, 480, **options)
    assert len(data) > HEAD_BYTES + TAIL_BYTES  # really header-only

    info = inspect(data)

    assert info == ImageInfo(format=image_format, width=640, height=480)


def test_given_webp_with_alpha_when_inspected_then_canvas_size() -> None:
    data = encode(noise_image(200, 120).convert("RGBA"), "WEBP", quality=70)

    info = inspect(data)

    assert (info.format, info.width, info.height) == ("WEBP", 200, 120)


@pytest.mark.parametrize(("image_format", "marker"), [("PNG", "IEND"), ("JPEG", "FFD9")])
def test_given_truncated_upload_when_inspected_then_unreadable_image(image_format: str, marker: str) -> None:
    data = image_bytes(image_format, 512, 512)[:-3000]

    error = rejected(data)

    assert error.code is ErrorCode.UNREADABLE_IMAGE
    assert error.message.startswith(f"truncated {image_format}")
    assert marker in error.message


def test_given_truncated_webp_when_inspected_then_unreadable_image_with_sizes() -> None:
    full = image_bytes("WEBP", 512, 512, quality=90)
    data = full[:-500]

    error = rejected(data)

    assert error.code is ErrorCode.UNREADABLE_IMAGE
    assert error.message == (
        f"truncated WEBP: the RIFF header declares {len(full)} bytes but the file has {len(data)}"
    )


def test_given_webp_with_trailing_bytes_when_inspected_then_unreadable_image() -> None:
    error = rejected(image_bytes("WEBP", 128, 128) + b"junk")

    assert error.code is ErrorCode.UNREADABLE_IMAGE
    assert "trailing data" in error.message


def test_given_jpeg_with_zero_padding_after_end_marker_when_inspected_then_accepted() -> None:
    assert inspect(image_bytes("JPEG", 128, 128) + bytes(200)).format == "JPEG"


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [
        (image_bytes("GIF", 128, 128), "file is a GIF image"),
        (image_bytes("BMP", 128, 128), "file is a BMP image"),
        (image_bytes("TIFF", 128, 128), "file is a TIFF image"),
        (b"<html><body>not an image</body></html>", "it looks like text"),
        (bytes(range(256)) * 4, "unrecognised binary data"),
    ],
)
def test_given_unsupported_content_named_png_when_inspected_then_unsupported_format_says_what_it_is(
    data: bytes, looks_like: str
) -> None:
    error = rejected(data)

    assert error.code is ErrorCode.UNSUPPORTED_FORMAT
    assert looks_like in error.message
    assert "supported formats are PNG (.png), JPEG (.jpg, .jpeg), WebP (.webp)" in error.message


def test_given_empty_file_when_inspected_then_unsupported_format_empty() -> None:
    with pytest.raises(LoraflowError) as caught:
        inspect_image(b"", b"", 0, PATH)

    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT
    assert "empty" in caught.value.message


def test_given_png_header_declaring_bomb_dimensions_when_inspected_then_too_large_without_decoding() -> None:
    data = png_with_declared_size(100_000, 100_000)  # 10 gigapixels declared, ~100 bytes on disk

    error = rejected(data)

    assert error.code is ErrorCode.IMAGE_TOO_LARGE
    assert "100000x100000" in error.message


def test_given_image_just_over_pixel_limit_when_inspected_then_too_large() -> None:
    error = rejected(png_with_declared_size(4097, 4096))

    assert error.code is ErrorCode.IMAGE_TOO_LARGE


def test_given_lower_pixel_limit_when_inspected_then_limit_applies() -> None:
    data = image_bytes("PNG", 128, 128)

    assert rejected(data, max_pixels=128 * 127).code is ErrorCode.IMAGE_TOO_LARGE
    assert inspect(data, max_pixels=128 * 128).width == 128


@pytest.mark.parametrize(("width", "height"), [(63, 512), (512, 40)])
def test_given_small_side_when_inspected_then_image_too_small(width: int, height: int) -> None:
    error = rejected(image_bytes("JPEG", width, height))

    assert error.code is ErrorCode.IMAGE_TOO_SMALL
    assert f"{width}x{height}" in error.message


def test_given_png_with_corrupt_header_checksum_when_inspected_then_unreadable_image() -> None:
    data = bytearray(image_bytes("PNG", 96, 96))
    data[29] ^= 0xFF  # inside IHDR's CRC

    error = rejected(bytes(data))

    assert error.code is ErrorCode.UNREADABLE_IMAGE
    assert "corrupt header" in error.message


def test_given_webp_with_unknown_first_chunk_when_inspected_then_unreadable_image() -> None:
    data = bytearray(image_bytes("WEBP", 96, 96))
    data[12:16] = b"XXXX"

    assert rejected(bytes(data)).code is ErrorCode.UNREADABLE_IMAGE


def test_given_jpeg_with_big_icc_profile_when_head_too_short_then_asks_for_more_bytes() -> None:
    data = jpeg_with_big_icc(200_000)

    with pytest.raises(NeedMoreBytes) as caught:
        inspect(data)

    assert HEAD_BYTES < caught.value.wanted <= min(len(data), MAX_HEAD_BYTES)
    assert inspect(data, head_bytes=caught.value.wanted * 4).width == 96


def test_given_jpeg_header_beyond_the_read_limit_when_inspected_then_unreadable_image() -> None:
    data = jpeg_with_big_icc(MAX_HEAD_BYTES + 100_000)

    with pytest.raises(LoraflowError) as caught:
        inspect(data, head_bytes=MAX_HEAD_BYTES)

    assert caught.value.code is ErrorCode.UNREADABLE_IMAGE
    assert str(MAX_HEAD_BYTES) in caught.value.message


def test_given_whole_jpeg_with_garbage_header_when_inspected_then_unreadable_image() -> None:
    data = b"\xff\xd8\xff\xe0" + struct.pack(">H", 60_000) + bytes(100) + b"\xff\xd9"

    error = rejected(data)

    assert error.code is ErrorCode.UNREADABLE_IMAGE
