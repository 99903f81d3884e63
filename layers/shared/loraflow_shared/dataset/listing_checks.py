"""Dataset checks that need only the listing (names and sizes), no object reads."""

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from loraflow_shared.dataset.captions import MAX_CAPTION_BYTES, MAX_METADATA_BYTES
from loraflow_shared.dataset.layout import (
    FOLDER_FORM,
    IMAGE_EXTENSIONS,
    METADATA_FILE,
    REG_FOLDER,
    REG_FOLDER_FORM,
    SUPPORTED_FORMATS,
    DatasetFiles,
    Subset,
    extension_of,
    is_junk_segment,
    is_unsupported_image,
    parse_subset_folder,
    subset_folder_of,
)
from loraflow_shared.dataset.objects import ObjectInfo
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem, problems_of

_MiB = 1024 * 1024


class ValidationLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    min_images: int = 1  # training images in total; each subset folder needs at least one image too
    max_images: int = 2000  # training and regularization images together
    max_repeats: int = 1000
    min_side: int = 64
    max_pixels: int = 4096 * 4096
    max_file_bytes: int = 50 * _MiB
    max_config_bytes: int = 64 * 1024
    max_caption_bytes: int = MAX_CAPTION_BYTES
    max_metadata_bytes: int = MAX_METADATA_BYTES


DEFAULT_LIMITS = ValidationLimits()


@dataclass
class Findings:
    problems: list[Problem] = field(default_factory=list)

    def add(self, code: ErrorCode, path: str, message: str) -> None:
        self.problems.append(Problem(code=code, path=path, message=message))

    def sorted(self, warnings: bool) -> list[Problem]:
        chosen = (problem for problem in self.problems if problem.is_warning == warnings)
        return sorted(chosen, key=lambda problem: (problem.path, problem.code, problem.message))


def report_unexpected(files: DatasetFiles, findings: Findings) -> None:
    for rel_path in files.unexpected:
        findings.add(ErrorCode.UNEXPECTED_FILE, rel_path, _unexpected_reason(rel_path))
    for folder in files.folders.values():
        for orphan in folder.orphan_captions:
            findings.add(ErrorCode.ORPHAN_CAPTION, orphan, "caption has no image with the same name, ignored")
        for unused, used in folder.shadowed_captions.items():
            if used == folder.metadata_file:
                message = f"ignored: captions in this folder come from {METADATA_FILE}"
            else:
                message = f"ignored: {used} is the caption used for this image"
            findings.add(ErrorCode.UNEXPECTED_FILE, unused, message)


def _unexpected_reason(rel_path: str) -> str:
    segments = rel_path.split("/")
    folder = subset_folder_of(rel_path)
    if any(is_junk_segment(segment) for segment in segments):
        return "hidden or system file, ignored"
    if len(segments) == 1 and (extension_of(rel_path) in IMAGE_EXTENSIONS or is_unsupported_image(rel_path)):
        return f"images at the dataset root are not used: put them in a folder named {FOLDER_FORM}"
    if folder is None:  # directly inside reg/
        return f"files directly in {REG_FOLDER}/ are not used: put class images in {REG_FOLDER_FORM}"
    if len(segments) > folder.count("/") + 2:
        return "files in sub-folders of a subset folder are not used"
    if segments[-1].startswith("metadata."):
        return f"only {METADATA_FILE} (JSON lines with file_name and text) is read for captions, ignored"
    return "not an image, caption or config file, ignored"


def report_unsupported_images(files: DatasetFiles, findings: Findings) -> None:
    """An image in a format loraflow does not read is an error wherever an image would be trained on."""
    for rel_path in files.unsupported_images:
        extension = extension_of(rel_path)
        message = (
            f"{extension} images are not read by loraflow; supported formats are {SUPPORTED_FORMATS}: "
            "convert the image (or rename it if it already is one of those)"
        )
        findings.add(ErrorCode.UNSUPPORTED_FORMAT, rel_path, message)


def check_folders(files: DatasetFiles, limits: ValidationLimits, findings: Findings) -> list[Subset]:
    """Parse every subset folder name; report bad names and empty folders."""
    if not files.train_folders:
        only_reg = " (regularization subsets alone train nothing)" if files.reg_folders else ""
        message = (
            f"no subset folder{only_reg}: put the images in a folder named {FOLDER_FORM} at the dataset root"
        )
        findings.add(ErrorCode.NO_ASSET_FOLDER, "", message)
    subsets: list[Subset] = []
    for folder, folder_files in files.folders.items():
        try:
            subsets.append(parse_subset_folder(folder, limits.max_repeats))
        except LoraflowError as exc:
            findings.problems.extend(problems_of(exc))
        if not folder_files.images:
            findings.add(ErrorCode.TOO_FEW_IMAGES, folder, f"folder has no images in {SUPPORTED_FORMATS}")
    return subsets


def check_counts(files: DatasetFiles, limits: ValidationLimits, findings: Findings) -> bool:
    """Check the image counts; returns whether images should be inspected at all."""
    total, train, reg = files.image_count, files.train_image_count, files.reg_image_count
    if total > limits.max_images:
        counted = f"{total} images" + (f" ({reg} of them in {REG_FOLDER}/)" if reg else "")
        message = f"{counted}, the limit is {limits.max_images} (image contents were not checked)"
        findings.add(ErrorCode.TOO_MANY_IMAGES, "", message)
        return False
    if 0 < train < limits.min_images:
        not_counted = f" ({REG_FOLDER}/ images do not count)" if reg else ""
        message = f"{train} images, at least {limits.min_images} are needed{not_counted}"
        findings.add(ErrorCode.TOO_FEW_IMAGES, "", message)
    return True


def report_duplicates(files: DatasetFiles, index: dict[str, ObjectInfo], findings: Findings) -> None:
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
