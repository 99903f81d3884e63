"""Validate an uploaded dataset from its listing plus a few small reads.

Reads the config and captions whole, and each image's first ``HEAD_BYTES`` and last ``TAIL_BYTES``
with ranged reads (each a round trip on S3, hence the thread pool). Every problem is collected,
never only the first; errors reject the dataset, warnings do not. A failing reader (storage
outage, object deleted meanwhile) raises: that is an infrastructure failure to retry, not a
dataset problem.
"""

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from pydantic import BaseModel, ConfigDict

from loraflow_shared.dataset.config import ParsedConfig, TrainingConfig, ignored_key_warnings, parse_config
from loraflow_shared.dataset.images import (
    FORMAT_EXTENSIONS,
    HEAD_BYTES,
    TAIL_BYTES,
    NeedMoreBytes,
    inspect_image,
)
from loraflow_shared.dataset.layout import (
    FOLDER_FORM,
    IMAGE_EXTENSIONS,
    DatasetFiles,
    Subset,
    check_key_safe,
    extension_of,
    group_files,
    is_junk_segment,
    parse_subset_folder,
    relative_path,
)
from loraflow_shared.dataset.objects import ObjectInfo, ObjectReader
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem, problems_of

__all__ = [
    "ObjectInfo",
    "ObjectReader",
    "SubsetSummary",
    "ValidationLimits",
    "ValidationReport",
    "validate_dataset",
]

READ_THREADS = 16
_MAX_HEAD_READS = 4  # 64 KiB, then 256 KiB, then 1 MiB; one spare in case the object shrinks
_MiB = 1024 * 1024


class ValidationLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    min_images: int = 1  # in total; each subset folder needs at least one image too
    max_images: int = 2000
    max_repeats: int = 1000
    min_side: int = 64
    max_pixels: int = 4096 * 4096
    max_file_bytes: int = 50 * _MiB
    max_config_bytes: int = 64 * 1024
    max_caption_bytes: int = 4096


DEFAULT_LIMITS = ValidationLimits()


class SubsetSummary(BaseModel):
    folder: str
    repeats: int
    trigger: str
    class_name: str | None
    image_count: int
    caption_count: int


class ValidationReport(BaseModel):
    dataset: str
    errors: list[Problem]
    warnings: list[Problem]
    config_file: str | None  # relative to the dataset root
    config: TrainingConfig | None
    ignored_keys: list[str]
    subsets: list[SubsetSummary]
    image_count: int
    bytes_read: int

    @property
    def accepted(self) -> bool:
        return not self.errors


@dataclass
class _Findings:
    problems: list[Problem] = field(default_factory=list)

    def add(self, code: ErrorCode, path: str, message: str) -> None:
        self.problems.append(Problem(code=code, path=path, message=message))

    def sorted(self, warnings: bool) -> list[Problem]:
        chosen = (problem for problem in self.problems if problem.is_warning == warnings)
        return sorted(chosen, key=lambda problem: (problem.path, problem.code, problem.message))


class _CountingReader:
    """Counts the bytes every read returns; shared by the worker threads."""

    def __init__(self, reader: ObjectReader) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        self.bytes_read = 0

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self._count(self._reader.read_range(key, start, end))

    def read_all(self, key: str) -> bytes:
        return self._count(self._reader.read_all(key))

    def _count(self, data: bytes) -> bytes:
        with self._lock:
            self.bytes_read += len(data)
        return data


def validate_dataset(
    dataset: str,
    objects: Sequence[ObjectInfo],
    reader: ObjectReader,
    limits: ValidationLimits = DEFAULT_LIMITS,
) -> ValidationReport:
    """Check a dataset listing (full keys ``<dataset>/...``) against the layout and content rules."""
    findings = _Findings()
    counting = _CountingReader(reader)
    index = _index_objects(dataset, objects, findings)
    files = group_files(index)
    _report_unexpected(files, findings)
    subsets = _check_folders(files, limits, findings)
    inspect_images = _check_counts(files, limits, findings)
    config_file = _pick_config_file(files, index, limits, findings)

    parsed: list[ParsedConfig] = []
    # Each read job returns its problems; pool.map keeps them in submission order.
    jobs: list[Callable[[], list[Problem]]] = []
    if config_file is not None:
        jobs.append(partial(_check_config, config_file, index[config_file], counting, parsed))
    for caption in files.used_captions:
        jobs.append(partial(_check_caption, caption, index[caption], counting, limits))
    for image in files.images if inspect_images else []:
        jobs.append(partial(_check_image, image, index[image], counting, limits))
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for problems in pool.map(lambda job: job(), jobs):
            findings.problems.extend(problems)
    _report_duplicates(files, index, findings)

    return ValidationReport(
        dataset=dataset,
        errors=findings.sorted(warnings=False),
        warnings=findings.sorted(warnings=True),
        config_file=config_file,
        config=parsed[0].config if parsed else None,
        ignored_keys=parsed[0].ignored_keys if parsed else [],
        subsets=[_summary(subset, files) for subset in subsets],
        image_count=files.image_count,
        bytes_read=counting.bytes_read,
    )


def _index_objects(dataset: str, objects: Sequence[ObjectInfo], findings: _Findings) -> dict[str, ObjectInfo]:
    """Relative path -> object, leaving out unsafe keys (reported). Folder markers keep their '/'."""
    index: dict[str, ObjectInfo] = {}
    for info in objects:
        try:
            rel_path = relative_path(dataset, info.key)
            is_folder_marker = rel_path.endswith("/") and info.size == 0
            check_key_safe(rel_path[:-1] if is_folder_marker else rel_path)
        except LoraflowError as exc:
            findings.problems.extend(problems_of(exc))
            continue
        index[rel_path] = info
    return index


def _report_unexpected(files: DatasetFiles, findings: _Findings) -> None:
    for rel_path in files.unexpected:
        segments = rel_path.split("/")
        if any(is_junk_segment(segment) for segment in segments):
            reason = "hidden or system file, ignored"
        elif len(segments) == 1 and extension_of(rel_path) in IMAGE_EXTENSIONS:
            reason = f"images at the dataset root are not used: put them in a folder named {FOLDER_FORM}"
        elif len(segments) > 2:
            reason = "files in sub-folders of a subset folder are not used"
        else:
            reason = "not an image, caption or config file, ignored"
        findings.add(ErrorCode.UNEXPECTED_FILE, rel_path, reason)
    for folder in files.folders.values():
        for orphan in folder.orphan_captions:
            findings.add(ErrorCode.ORPHAN_CAPTION, orphan, "caption has no image with the same name, ignored")
        for unused, used in folder.shadowed_captions.items():
            message = f"ignored: {used} is the caption used for this image"
            findings.add(ErrorCode.UNEXPECTED_FILE, unused, message)


def _check_folders(files: DatasetFiles, limits: ValidationLimits, findings: _Findings) -> list[Subset]:
    """Parse every subset folder name; report bad names and empty folders."""
    if not files.folders:
        findings.add(
            ErrorCode.NO_ASSET_FOLDER,
            "",
            f"no subset folder: put the images in a folder named {FOLDER_FORM} at the dataset root",
        )
    subsets: list[Subset] = []
    for folder, folder_files in files.folders.items():
        try:
            subsets.append(parse_subset_folder(folder, limits.max_repeats))
        except LoraflowError as exc:
            findings.problems.extend(problems_of(exc))
        if not folder_files.images:
            findings.add(ErrorCode.TOO_FEW_IMAGES, folder, "folder has no images (.png, .jpg, .jpeg, .webp)")
    return subsets


def _check_counts(files: DatasetFiles, limits: ValidationLimits, findings: _Findings) -> bool:
    """Check the total image count; returns whether images should be inspected at all."""
    total = files.image_count
    if total > limits.max_images:
        message = f"{total} images, the limit is {limits.max_images} (image contents were not checked)"
        findings.add(ErrorCode.TOO_MANY_IMAGES, "", message)
        return False
    if 0 < total < limits.min_images:
        findings.add(ErrorCode.TOO_FEW_IMAGES, "", f"{total} images, at least {limits.min_images} are needed")
    return True


def _pick_config_file(
    files: DatasetFiles, index: dict[str, ObjectInfo], limits: ValidationLimits, findings: _Findings
) -> str | None:
    """The one root ``*.toml``, if there is exactly one and it is small enough to read."""
    if not files.config_files:
        findings.add(ErrorCode.INVALID_CONFIG, "", "no .toml config at the dataset root")
        return None
    if len(files.config_files) > 1:
        names = ", ".join(files.config_files)
        message = f"several .toml configs at the dataset root ({names}): keep one"
        findings.add(ErrorCode.INVALID_CONFIG, "", message)
        return None
    config_file = files.config_files[0]
    size = index[config_file].size
    if size > limits.max_config_bytes:
        message = f"config is {size} bytes, the limit is {limits.max_config_bytes}"
        findings.add(ErrorCode.INVALID_CONFIG, config_file, message)
        return None
    return config_file


def _check_config(
    config_file: str, info: ObjectInfo, reader: ObjectReader, parsed_out: list[ParsedConfig]
) -> list[Problem]:
    try:
        parsed = parse_config(reader.read_all(info.key), config_file)
    except LoraflowError as exc:
        return problems_of(exc)
    parsed_out.append(parsed)
    return ignored_key_warnings(parsed, config_file)


def _check_caption(
    rel_path: str, info: ObjectInfo, reader: ObjectReader, limits: ValidationLimits
) -> list[Problem]:
    def bad(message: str) -> list[Problem]:
        return [Problem(code=ErrorCode.BAD_CAPTION, path=rel_path, message=message)]

    if info.size > limits.max_caption_bytes:
        return bad(f"caption is {info.size} bytes, the limit is {limits.max_caption_bytes}")
    if info.size == 0:
        return bad("caption is empty")
    try:
        text = reader.read_all(info.key).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return bad(f"caption is not UTF-8 text ({exc.reason} at byte {exc.start})")
    if not text.strip():
        return bad("caption is empty (only whitespace)")
    return []


def _check_image(
    rel_path: str, info: ObjectInfo, reader: ObjectReader, limits: ValidationLimits
) -> list[Problem]:
    key = info.key
    if info.size == 0:
        return [Problem(code=ErrorCode.UNSUPPORTED_FORMAT, path=rel_path, message="file is empty")]
    if info.size > limits.max_file_bytes:
        message = f"file is {info.size} bytes, the limit is {limits.max_file_bytes}"
        return [Problem(code=ErrorCode.FILE_TOO_LARGE, path=rel_path, message=message)]
    head = reader.read_range(key, 0, min(info.size, HEAD_BYTES) - 1)
    if len(head) >= info.size:  # small file: the head is the whole file
        tail = head[-TAIL_BYTES:]
    else:
        tail = reader.read_range(key, info.size - TAIL_BYTES, info.size - 1)
    for _ in range(_MAX_HEAD_READS):
        try:
            image = inspect_image(
                head, tail, info.size, rel_path, min_side=limits.min_side, max_pixels=limits.max_pixels
            )
        except NeedMoreBytes as more:
            head = reader.read_range(key, 0, more.wanted - 1)
            continue
        except LoraflowError as exc:
            return problems_of(exc)
        return _extension_warnings(rel_path, image.format)
    message = "image header could not be read (the object changed while it was being read?)"
    return [Problem(code=ErrorCode.UNREADABLE_IMAGE, path=rel_path, message=message)]


def _extension_warnings(rel_path: str, image_format: str) -> list[Problem]:
    extension = extension_of(rel_path)
    if extension in FORMAT_EXTENSIONS[image_format]:
        return []
    message = f"file is {image_format} but named {extension}; it is read as {image_format}"
    return [Problem(code=ErrorCode.EXTENSION_MISMATCH, path=rel_path, message=message)]


def _report_duplicates(files: DatasetFiles, index: dict[str, ObjectInfo], findings: _Findings) -> None:
    """Same size and single-part ETag (the content MD5) means the same bytes."""
    first_seen: dict[tuple[str, int], str] = {}
    for rel_path in files.images:
        info = index[rel_path]
        if not info.etag or "-" in info.etag:  # multipart ETags are not content hashes
            continue
        signature = (info.etag, info.size)
        if signature in first_seen:
            findings.add(ErrorCode.DUPLICATE_IMAGE, rel_path, f"same content as {first_seen[signature]}")
        else:
            first_seen[signature] = rel_path


def _summary(subset: Subset, files: DatasetFiles) -> SubsetSummary:
    folder_files = files.folders[subset.folder]
    return SubsetSummary(
        folder=subset.folder,
        repeats=subset.repeats,
        trigger=subset.trigger,
        class_name=subset.class_name,
        image_count=len(folder_files.images),
        caption_count=len(folder_files.captions),
    )
