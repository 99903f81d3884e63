"""Caption rules shared by validation and the trainer: caption files and imagefolder metadata.jsonl."""

import json
from collections.abc import Callable

import pytest
from loraflow_shared.dataset.captions import (
    MAX_PROBLEMS_PER_METADATA,
    caption_texts,
    decode_caption,
    parse_metadata,
)
from loraflow_shared.dataset.layout import group_files
from loraflow_shared.errors import ErrorCode, LoraflowError, ValidationFailed

METADATA = "60_a/metadata.jsonl"
IMAGES = ["60_a/1.png", "60_a/2.png", "60_a/3.jpg"]


def jsonl(*entries: object) -> bytes:
    return "".join(json.dumps(entry) + "\n" for entry in entries).encode()


def metadata_messages(data: bytes, max_caption_bytes: int = 4096) -> list[str]:
    parsed = parse_metadata(data, METADATA, IMAGES, max_caption_bytes)
    assert {(p.code, p.path) for p in parsed.problems} <= {(ErrorCode.BAD_CAPTION, METADATA)}
    return [problem.message for problem in parsed.problems]


def test_given_good_caption_when_decoded_then_stripped_text() -> None:
    assert decode_caption("\ufeff  dwjz, a dog \n".encode(), "60_a/1.txt") == "dwjz, a dog"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "caption is empty"),
        (b" \n\t", "caption is empty (only whitespace)"),
        (b"\xff\xfe", "caption is not UTF-8 text (invalid start byte at byte 0)"),
        (b"x" * 11, "caption is 11 bytes, the limit is 10"),
    ],
)
def test_given_bad_caption_when_decoded_then_bad_caption_with_path(data: bytes, message: str) -> None:
    with pytest.raises(LoraflowError) as caught:
        decode_caption(data, "60_a/1.txt", max_bytes=10)

    assert (caught.value.code, caught.value.path, caught.value.message) == (
        ErrorCode.BAD_CAPTION,
        "60_a/1.txt",
        message,
    )


def test_given_valid_metadata_when_parsed_then_captions_by_image_path() -> None:
    data = jsonl(
        {"file_name": "1.png", "text": " a dog on grass "},
        {"file_name": "./3.jpg", "text": "a dog at night", "score": 7},
    )

    parsed = parse_metadata(data + b"\n\n", METADATA, IMAGES)

    assert parsed.problems == []
    assert parsed.captions == {"60_a/1.png": "a dog on grass", "60_a/3.jpg": "a dog at night"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "{not json",
            "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        ),
        ('["1.png", "x"]', 'line 2: expected a JSON object with "file_name" and "text"'),
        ('{"text": "x"}', 'line 2: "file_name" is missing or not a string'),
        ('{"file_name": 3, "text": "x"}', 'line 2: "file_name" is missing or not a string'),
        (
            '{"file_name": "2.png"}',
            "line 2: \"text\" (the caption of '2.png') is missing, empty or not a string",
        ),
        ('{"file_name": "2.png", "text": "  "}', "line 2: \"text\" (the caption of '2.png') is missing"),
        ('{"file_name": "2.png", "text": 5}', "line 2: \"text\" (the caption of '2.png') is missing"),
        (
            '{"file_name": "9.png", "text": "x"}',
            "line 2: file_name '9.png' is not an image directly in 60_a/",
        ),
        ('{"file_name": "sub/2.png", "text": "x"}', "line 2: file_name 'sub/2.png' is not an image directly"),
        (
            '{"file_name": "1.png", "text": "again"}',
            "line 2: file_name '1.png' already has a caption on line 1",
        ),
        (
            '{"file_name": "2.png", "text": "' + "é" * 6 + '"}',
            "line 2: the caption of '2.png' is 12 bytes, the",
        ),
    ],
)
def test_given_bad_metadata_line_when_parsed_then_bad_caption_names_the_line(line: str, message: str) -> None:
    data = jsonl({"file_name": "1.png", "text": "a dog"}) + line.encode() + b"\n"

    messages = metadata_messages(data, max_caption_bytes=10)

    assert len(messages) == 1
    assert messages[0].startswith(message)


def test_given_bad_line_when_parsed_then_good_lines_still_read() -> None:
    data = (
        jsonl({"file_name": "1.png", "text": "a dog"})
        + b"oops\n"
        + jsonl({"file_name": "2.png", "text": "b"})
    )

    parsed = parse_metadata(data, METADATA, IMAGES)

    assert [p.message.split(":")[0] for p in parsed.problems] == ["line 2"]
    assert sorted(parsed.captions) == ["60_a/1.png", "60_a/2.png"]


@pytest.mark.parametrize("data", [b"", b"\n \n"])
def test_given_metadata_without_lines_when_parsed_then_bad_caption(data: bytes) -> None:
    assert metadata_messages(data)[0].startswith("metadata has no lines")


def test_given_non_utf8_metadata_when_parsed_then_one_problem_with_byte_offset() -> None:
    assert metadata_messages(b'{"file_name": "1.png", "text": "\xff"}\n') == [
        "metadata is not UTF-8 text (invalid start byte at byte 32)"
    ]


def test_given_every_line_broken_when_parsed_then_problems_capped_with_a_count() -> None:
    messages = metadata_messages(b"x\n" * (MAX_PROBLEMS_PER_METADATA + 5))

    assert len(messages) == MAX_PROBLEMS_PER_METADATA + 1
    assert messages[-1] == "and 5 more lines with problems"


def reader_of(files: dict[str, bytes]) -> Callable[[str], bytes]:
    return lambda path: files[path]


def test_given_caption_files_when_caption_texts_then_file_or_folder_caption() -> None:
    files = {"60_a/1.png": b"", "60_a/1.txt": b"dwjz on grass\n", "60_a/2.png": b""}
    subset_files = group_files(files).folders["60_a"]

    captions = caption_texts(subset_files, "dwjz", reader_of(files))

    assert captions == {"60_a/1.png": "dwjz on grass", "60_a/2.png": "dwjz"}


def test_given_metadata_when_caption_texts_then_metadata_wins_and_unlisted_image_gets_folder_caption() -> (
    None
):
    files = {
        METADATA: jsonl({"file_name": "1.png", "text": "from metadata"}),
        "60_a/1.png": b"",
        "60_a/1.txt": b"from the caption file",
        "60_a/2.png": b"",
    }
    subset_files = group_files(files).folders["60_a"]

    captions = caption_texts(subset_files, "dwjz", reader_of(files))

    assert captions == {"60_a/1.png": "from metadata", "60_a/2.png": "dwjz"}


def test_given_bad_metadata_when_caption_texts_then_validation_failed_with_every_problem() -> None:
    files = {METADATA: b"x\ny\n", "60_a/1.png": b""}
    subset_files = group_files(files).folders["60_a"]

    with pytest.raises(ValidationFailed) as caught:
        caption_texts(subset_files, "dwjz", reader_of(files))

    assert [p.message.split(":")[0] for p in caught.value.problems] == ["line 1", "line 2"]


def test_given_oversized_metadata_when_caption_texts_then_bad_caption() -> None:
    files = {METADATA: jsonl({"file_name": "1.png", "text": "x" * 100}), "60_a/1.png": b""}
    subset_files = group_files(files).folders["60_a"]

    with pytest.raises(LoraflowError) as caught:
        caption_texts(subset_files, "dwjz", reader_of(files), max_metadata_bytes=50)

    assert (caught.value.code, caught.value.path) == (ErrorCode.BAD_CAPTION, METADATA)
    assert caught.value.message.endswith("the limit is 50")


def test_given_empty_caption_file_when_caption_texts_then_bad_caption() -> None:
    files = {"60_a/1.png": b"", "60_a/1.txt": b"   "}

    with pytest.raises(LoraflowError) as caught:
        caption_texts(group_files(files).folders["60_a"], "dwjz", reader_of(files))

    assert (caught.value.code, caught.value.path) == (ErrorCode.BAD_CAPTION, "60_a/1.txt")
