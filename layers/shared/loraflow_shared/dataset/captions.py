"""Caption text rules, shared by validation (on S3 objects) and the trainer (on the channel).

Caption files are read whole; a ``metadata.jsonl`` (Hugging Face ``imagefolder``) is read whole
too, under its own size cap, and checked line by line: each line is a JSON object whose
``file_name`` names an image directly in the same folder and whose ``text`` is the caption.
"""

import json
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, Field

from loraflow_shared.dataset.layout import SUPPORTED_FORMATS, SubsetFiles, is_unsupported_image
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem, ValidationFailed

MAX_CAPTION_BYTES = 4096
MAX_METADATA_BYTES = 8 * 1024 * 1024  # 2000 images x a full-length caption fits
MAX_PROBLEMS_PER_METADATA = 20  # a wholly broken file gives a readable list, not thousands of lines


def decode_caption(data: bytes, path: str, max_bytes: int = MAX_CAPTION_BYTES) -> str:
    """The caption text (stripped); raises BAD_CAPTION when it is too long, not UTF-8 or empty."""
    if len(data) > max_bytes:
        raise LoraflowError(
            ErrorCode.BAD_CAPTION, f"caption is {len(data)} bytes, the limit is {max_bytes}", path
        )
    if not data:
        raise LoraflowError(ErrorCode.BAD_CAPTION, "caption is empty", path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        message = f"caption is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise LoraflowError(ErrorCode.BAD_CAPTION, message, path) from exc
    if not text.strip():
        raise LoraflowError(ErrorCode.BAD_CAPTION, "caption is empty (only whitespace)", path)
    return text.strip()


class MetadataCaptions(BaseModel):
    """What one ``metadata.jsonl`` says: image path (from the dataset root) -> caption."""

    captions: dict[str, str] = Field(default_factory=dict)
    problems: list[Problem] = Field(default_factory=list)  # BAD_CAPTION, path = the metadata file


def parse_metadata(
    data: bytes, metadata_path: str, images: Sequence[str], max_caption_bytes: int = MAX_CAPTION_BYTES
) -> MetadataCaptions:
    """Check every line of ``metadata_path`` against the folder's ``images``; never raises."""
    result = MetadataCaptions()

    def bad(message: str) -> None:
        result.problems.append(Problem(code=ErrorCode.BAD_CAPTION, path=metadata_path, message=message))

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad(f"metadata is not UTF-8 text ({exc.reason} at byte {exc.start})")
        return result
    folder = posixpath.dirname(metadata_path)
    images_by_name = {posixpath.basename(image): image for image in images}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry nothing
        try:
            name, caption = _read_line(line, max_caption_bytes)
            if name not in images_by_name:
                raise ValueError(_not_an_image(name, folder))
            if name in first_line:
                raise ValueError(f"file_name {name!r} already has a caption on line {first_line[name]}")
        except ValueError as exc:
            bad(f"line {number}: {exc}")
            continue
        first_line[name] = number
        result.captions[images_by_name[name]] = caption
    if not first_line and not result.problems:
        bad('metadata has no lines: give each image a line like {"file_name": "a.png", "text": "..."}')
    return _capped(result, metadata_path)


def _not_an_image(name: str, folder: str) -> str:
    if is_unsupported_image(name):
        return (
            f"file_name {name!r} is in a format loraflow does not read (supported: {SUPPORTED_FORMATS}); "
            "convert the image and name the new file here"
        )
    return f"file_name {name!r} is not an image directly in {folder}/"


def _read_line(line: str, max_caption_bytes: int) -> tuple[str, str]:
    """(file name, caption) of one line; ValueError says what is wrong with it."""
    try:
        entry: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(entry, dict):
        raise ValueError('expected a JSON object with "file_name" and "text"')
    name, caption = entry.get("file_name"), entry.get("text")
    if not isinstance(name, str) or not name:
        raise ValueError('"file_name" is missing or not a string')
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f'"text" (the caption of {name!r}) is missing, empty or not a string')
    size = len(caption.encode("utf-8"))
    if size > max_caption_bytes:
        raise ValueError(f"the caption of {name!r} is {size} bytes, the limit is {max_caption_bytes}")
    return name.removeprefix("./"), caption.strip()


def _capped(result: MetadataCaptions, metadata_path: str) -> MetadataCaptions:
    extra = len(result.problems) - MAX_PROBLEMS_PER_METADATA
    if extra > 0:
        kept = result.problems[:MAX_PROBLEMS_PER_METADATA]
        summary = Problem(
            code=ErrorCode.BAD_CAPTION, path=metadata_path, message=f"and {extra} more lines with problems"
        )
        result.problems = [*kept, summary]
    return result


def caption_texts(
    files: SubsetFiles,
    default_caption: str,
    read: Callable[[str], bytes],
    max_caption_bytes: int = MAX_CAPTION_BYTES,
    max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> dict[str, str]:
    """Every image of a subset -> its caption, by ``files.caption_source``: what the trainer uses.

    ``read`` returns a file's bytes by its path from the dataset root. Raises ``ValidationFailed``
    (BAD_CAPTION) on the first bad caption file, or with every problem of a bad metadata file.
    """
    from_metadata: dict[str, str] = {}
    if files.metadata_file is not None:
        data = read(files.metadata_file)
        if len(data) > max_metadata_bytes:
            message = f"metadata is {len(data)} bytes, the limit is {max_metadata_bytes}"
            raise LoraflowError(ErrorCode.BAD_CAPTION, message, files.metadata_file)
        parsed = parse_metadata(data, files.metadata_file, files.images, max_caption_bytes)
        if parsed.problems:
            raise ValidationFailed(parsed.problems)
        from_metadata = parsed.captions
    captions: dict[str, str] = {}
    for image in files.images:
        source = files.caption_source(image)
        if source.kind == "file" and source.path is not None:
            captions[image] = decode_caption(read(source.path), source.path, max_caption_bytes)
        else:
            captions[image] = from_metadata.get(image, default_caption)
    return captions
