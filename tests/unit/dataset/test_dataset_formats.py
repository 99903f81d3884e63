"""Image formats: files named as images loraflow does not read are UNSUPPORTED_FORMAT in every kind of
subset folder, and JPEG processes Pillow cannot decode are refused from the header."""

import json

import pytest
from dataset_memory import MemoryBucket
from imagegen import encode, image_bytes, noise_image
from loraflow_shared.dataset.images import HEAD_BYTES, TAIL_BYTES, NeedMoreBytes, inspect_image
from loraflow_shared.dataset.layout import (
    IMAGE_EXTENSIONS,
    SUPPORTED_FORMATS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    group_files,
)
from loraflow_shared.dataset.validate import ValidationReport, validate_dataset
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem

DATASET = "formats"
PNG = image_bytes("PNG", 96, 96, seed=1)


def validate(files: dict[str, bytes]) -> ValidationReport:
    bucket = MemoryBucket({f"{DATASET}/{path}": data for path, data in files.items()})
    return validate_dataset(DATASET, bucket.listing(), bucket)


def codes(problems: list[Problem]) -> list[tuple[ErrorCode, str]]:
    return [(problem.code, problem.path) for problem in problems]


# --- extensions loraflow does not read


def test_given_extension_lists_when_compared_then_supported_and_unsupported_are_disjoint() -> None:
    assert not set(IMAGE_EXTENSIONS) & UNSUPPORTED_IMAGE_EXTENSIONS
    assert {
        ".bmp",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
        ".gif",
        ".jxl",
    } <= UNSUPPORTED_IMAGE_EXTENSIONS
    assert all(extension == extension.lower() for extension in UNSUPPORTED_IMAGE_EXTENSIONS)


@pytest.mark.parametrize(
    ("name", "image_format"),
    [("a.bmp", "BMP"), ("a.TIFF", "TIFF"), ("a.gif", "GIF"), ("a.heic", None), ("a.avif", None)],
)
@pytest.mark.parametrize("folder", ["60_dwjz", "reg/1_dog", "10_hf"])
def test_given_unread_image_format_in_any_subset_kind_when_validated_then_unsupported_format(
    folder: str, name: str, image_format: str | None
) -> None:
    data = image_bytes(image_format, 96, 96) if image_format else b"\x00\x00\x00\x1cftypheic" + bytes(64)
    files = {
        "config.toml": b"",
        "60_dwjz/ok.png": PNG,
        "reg/1_dog/ok.png": image_bytes("PNG", 96, 96, seed=2),
        "10_hf/ok.png": image_bytes("PNG", 96, 96, seed=3),
        "10_hf/metadata.jsonl": json.dumps({"file_name": "ok.png", "text": "hf photo"}).encode() + b"\n",
        f"{folder}/{name}": data,
    }

    report = validate(files)

    assert codes(report.errors) == [(ErrorCode.UNSUPPORTED_FORMAT, f"{folder}/{name}")]
    assert f"supported formats are {SUPPORTED_FORMATS}" in report.errors[0].message
    assert name.rsplit(".", 1)[1].lower() in report.errors[0].message
    assert report.warnings == []  # reported once, as an error, not also as an unexpected file


def test_given_folder_with_only_unread_images_when_validated_then_each_reported_and_folder_empty() -> None:
    files = {"config.toml": b"", "60_dwjz/a.heic": b"heic", "60_dwjz/b.HEIF": b"heif", "5_x/ok.png": PNG}

    report = validate(files)

    assert codes(report.errors) == [
        (ErrorCode.TOO_FEW_IMAGES, "60_dwjz"),
        (ErrorCode.UNSUPPORTED_FORMAT, "60_dwjz/a.heic"),
        (ErrorCode.UNSUPPORTED_FORMAT, "60_dwjz/b.HEIF"),
    ]
    assert SUPPORTED_FORMATS in report.errors[0].message


def test_given_unread_images_where_no_image_is_used_when_validated_then_unexpected_file_as_for_png() -> None:
    files = {"config.toml": b"", "60_dwjz/ok.png": PNG, "top.bmp": b"BM", "60_dwjz/sub/x.tif": b"II*\x00"}

    report = validate(files)

    assert report.accepted, report.errors
    assert codes(report.warnings) == [
        (ErrorCode.UNEXPECTED_FILE, "60_dwjz/sub/x.tif"),
        (ErrorCode.UNEXPECTED_FILE, "top.bmp"),
    ]
    assert "images at the dataset root are not used" in report.warnings[1].message


def test_given_metadata_line_naming_unread_image_when_validated_then_line_says_to_convert() -> None:
    metadata = json.dumps({"file_name": "x.heic", "text": "a photo"}) + "\n"
    files = {
        "config.toml": b"",
        "10_hf/ok.png": PNG,
        "10_hf/x.heic": b"heic",
        "10_hf/metadata.jsonl": metadata,
    }

    report = validate(
        {name: data if isinstance(data, bytes) else data.encode() for name, data in files.items()}
    )

    assert codes(report.errors) == [
        (ErrorCode.BAD_CAPTION, "10_hf/metadata.jsonl"),
        (ErrorCode.UNSUPPORTED_FORMAT, "10_hf/x.heic"),
    ]
    assert "line 1: file_name 'x.heic' is in a format loraflow does not read" in report.errors[0].message


def test_given_unread_images_when_grouped_then_trainer_listing_leaves_them_out_but_keeps_them_apart() -> None:
    files = group_files(["60_a/x.png", "60_a/y.webp", "60_a/z.heic", "reg/1_b/w.bmp"])

    assert files.images == ["60_a/x.png", "60_a/y.webp"]
    assert files.unsupported_images == ["60_a/z.heic", "reg/1_b/w.bmp"]
    assert files.unexpected == []


# --- JPEG processes Pillow cannot decode


def frame_header_offset(data: bytes) -> int:
    return data.index(b"\xff\xc0")


def with_frame_byte(data: bytes, offset_in_frame: int, value: int) -> bytes:
    patched = bytearray(data)
    patched[frame_header_offset(data) + offset_in_frame] = value
    return bytes(patched)


@pytest.mark.parametrize(
    ("offset", "value", "what"),
    [
        (4, 12, "12-bit JPEG"),  # sample precision
        (1, 0xC5, "hierarchical (differential) JPEG"),  # SOF5 instead of SOF0
        (9, 2, "JPEG with 2 channels"),
    ],
)
def test_given_jpeg_process_pillow_cannot_decode_when_inspected_then_unsupported_format(
    offset: int, value: int, what: str
) -> None:
    data = with_frame_byte(image_bytes("JPEG", 128, 128), offset, value)

    with pytest.raises(LoraflowError) as caught:
        inspect_image(data[:65536], data[-TAIL_BYTES:], len(data), "60_a/x.jpg")

    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT
    assert caught.value.message.startswith(f"{what}; loraflow reads 8-bit JPEG")


def test_given_jpeg_frame_after_a_large_icc_block_when_inspected_then_checked_once_it_is_read() -> None:
    data = with_frame_byte(encode(noise_image(96, 96), "JPEG", icc_profile=bytes(100_000)), 4, 12)
    assert frame_header_offset(data) > HEAD_BYTES

    with pytest.raises(NeedMoreBytes):
        inspect_image(data[:HEAD_BYTES], data[-TAIL_BYTES:], len(data), "60_a/x.jpg")
    with pytest.raises(LoraflowError) as caught:
        inspect_image(data, data[-TAIL_BYTES:], len(data), "60_a/x.jpg")

    assert caught.value.code is ErrorCode.UNSUPPORTED_FORMAT


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_given_8bit_jpeg_of_each_channel_count_when_inspected_then_accepted(mode: str) -> None:
    data = encode(noise_image(96, 96).convert(mode), "JPEG", quality=90)

    info = inspect_image(data, data[-TAIL_BYTES:], len(data), "60_a/x.jpg")

    assert (info.format, info.width, info.height) == ("JPEG", 96, 96)
