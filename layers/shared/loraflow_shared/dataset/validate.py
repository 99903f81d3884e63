"""Validate an uploaded dataset from its listing plus a few small reads.

Reads the config, captions and ``metadata.jsonl`` files whole (each under a size cap), and each
image's first ``HEAD_BYTES`` and last ``TAIL_BYTES`` with ranged reads (each a round trip on S3,
hence the thread pool). Every problem is collected, never only the first; errors reject the
dataset, warnings do not. A failing reader (storage outage, object deleted meanwhile) raises:
that is an infrastructure failure to retry, not a dataset problem.
"""

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from pydantic import BaseModel

from loraflow_shared.dataset.captions import decode_caption, parse_metadata
from loraflow_shared.dataset.config import ParsedConfig, TrainingConfig, config_warnings, parse_config
from loraflow_shared.dataset.images import (
    HEAD_BYTES,
    TAIL_BYTES,
    NeedMoreBytes,
    inspect_image,
)
from loraflow_shared.dataset.layout import (
    FORMAT_EXTENSIONS,
    DatasetFiles,
    Subset,
    SubsetFiles,
    check_key_safe,
    extension_of,
    group_files,
    relative_path,
)
from loraflow_shared.dataset.listing_checks import (
    DEFAULT_LIMITS,
    Findings,
    ValidationLimits,
    check_counts,
    check_folders,
    report_duplicates,
    report_unexpected,
    report_unsupported_images,
)
from loraflow_shared.dataset.objects import ObjectInfo, ObjectReader
from loraflow_shared.dataset.preview_budget import preview_budget_problem
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


class SubsetSummary(BaseModel):
    folder: str  # from the dataset root: "60_dwjz", "reg/1_dog"
    repeats: int
    trigger: str
    class_name: str | None
    image_count: int
    caption_count: int  # images with their own caption (a caption file or a metadata.jsonl line)
    is_reg: bool = False
    metadata_file: str | None = None


class ValidationReport(BaseModel):
    dataset: str
    errors: list[Problem]
    warnings: list[Problem]
    config_file: str | None  # relative to the dataset root
    config: TrainingConfig | None
    ignored_keys: list[str]
    subsets: list[SubsetSummary]  # training subsets
    image_count: int  # training and regularization images
    bytes_read: int
    reg_subsets: list[SubsetSummary] = []
    train_image_count: int = 0
    reg_image_count: int = 0

    @property
    def accepted(self) -> bool:
        return not self.errors


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
    findings = Findings()
    counting = _CountingReader(reader)
    index = _index_objects(dataset, objects, findings)
    files = group_files(index)
    report_unexpected(files, findings)
    report_unsupported_images(files, findings)
    subsets = check_folders(files, limits, findings)
    inspect_images = check_counts(files, limits, findings)
    config_file = _pick_config_file(files, index, limits, findings)

    parsed: list[ParsedConfig] = []
    metadata_counts: dict[str, int] = {}  # metadata file -> images it captions
    # Each read job returns its problems; pool.map keeps them in submission order.
    jobs: list[Callable[[], list[Problem]]] = []
    if config_file is not None:
        jobs.append(partial(_check_config, config_file, index[config_file], counting, parsed))
    for caption in files.used_captions:
        jobs.append(partial(_check_caption, caption, index[caption], counting, limits))
    for folder in files.folders.values():
        if folder.metadata_file is not None:
            info = index[folder.metadata_file]
            jobs.append(partial(_check_metadata, folder, info, counting, limits, metadata_counts))
    for image in files.images if inspect_images else []:
        jobs.append(partial(_check_image, image, index[image], counting, limits))
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for problems in pool.map(lambda job: job(), jobs):
            findings.problems.extend(problems)
    report_duplicates(files, index, findings)
    if parsed and config_file is not None:
        findings.problems.extend(_check_previews(parsed[0].config, subsets, config_file))

    return ValidationReport(
        dataset=dataset,
        errors=findings.sorted(warnings=False),
        warnings=findings.sorted(warnings=True),
        config_file=config_file,
        config=parsed[0].config if parsed else None,
        ignored_keys=parsed[0].ignored_keys if parsed else [],
        subsets=[_summary(subset, files, metadata_counts) for subset in subsets if not subset.is_reg],
        image_count=files.image_count,
        bytes_read=counting.bytes_read,
        reg_subsets=[_summary(subset, files, metadata_counts) for subset in subsets if subset.is_reg],
        train_image_count=files.train_image_count,
        reg_image_count=files.reg_image_count,
    )


def _index_objects(dataset: str, objects: Sequence[ObjectInfo], findings: Findings) -> dict[str, ObjectInfo]:
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


def _pick_config_file(
    files: DatasetFiles, index: dict[str, ObjectInfo], limits: ValidationLimits, findings: Findings
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
    return config_warnings(parsed, config_file)


def _check_previews(config: TrainingConfig, subsets: Sequence[Subset], config_file: str) -> list[Problem]:
    """The job's previews must render within one endpoint invocation (``preview_budget``)."""
    problem = preview_budget_problem(config, subsets, config_file)
    return [problem] if problem else []


def _check_caption(
    rel_path: str, info: ObjectInfo, reader: ObjectReader, limits: ValidationLimits
) -> list[Problem]:
    if info.size > limits.max_caption_bytes:  # judged from the listing: an oversized file is not read
        message = f"caption is {info.size} bytes, the limit is {limits.max_caption_bytes}"
        return [Problem(code=ErrorCode.BAD_CAPTION, path=rel_path, message=message)]
    try:
        decode_caption(reader.read_all(info.key) if info.size else b"", rel_path, limits.max_caption_bytes)
    except LoraflowError as exc:
        return problems_of(exc)
    return []


def _check_metadata(
    folder: SubsetFiles,
    info: ObjectInfo,
    reader: ObjectReader,
    limits: ValidationLimits,
    captioned_out: dict[str, int],
) -> list[Problem]:
    path = folder.metadata_file or ""
    if info.size > limits.max_metadata_bytes:
        message = f"metadata is {info.size} bytes, the limit is {limits.max_metadata_bytes}"
        return [Problem(code=ErrorCode.BAD_CAPTION, path=path, message=message)]
    data = reader.read_all(info.key) if info.size else b""
    parsed = parse_metadata(data, path, folder.images, limits.max_caption_bytes)
    captioned_out[path] = len(parsed.captions)
    return parsed.problems


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


def _summary(subset: Subset, files: DatasetFiles, metadata_counts: dict[str, int]) -> SubsetSummary:
    folder_files = files.folders[subset.folder]
    metadata_file = folder_files.metadata_file
    captioned = metadata_counts.get(metadata_file, 0) if metadata_file else len(folder_files.captions)
    return SubsetSummary(
        folder=subset.folder,
        repeats=subset.repeats,
        trigger=subset.trigger,
        class_name=subset.class_name,
        image_count=len(folder_files.images),
        caption_count=captioned,
        is_reg=subset.is_reg,
        metadata_file=metadata_file,
    )
