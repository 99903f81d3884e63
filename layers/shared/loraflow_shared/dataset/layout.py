"""The kohya dataset layout: what each file of an uploaded dataset is, and what its folders mean.

A dataset is ``<dataset>/`` holding one kohya ``*.toml`` config at its root and subset folders
``<repeats>_<trigger>[ <class>]/`` (e.g. ``60_dwjz``, ``20_zqxj dog``) with images and captions
directly inside. Regularization (prior-preservation) subsets, kohya's ``reg_data_dir``, sit one
level down in ``reg/<repeats>_<class>/``. A subset folder holding ``metadata.jsonl`` is a Hugging
Face ``imagefolder``: its captions come from that file. Paths here are relative to the dataset root
and use ``/``.
"""

import posixpath
import re
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loraflow_shared.errors import ErrorCode, LoraflowError

# The image formats loraflow reads, by Pillow's format name, with the extensions that name an image file.
# Content decides the format (magic bytes); the extension decides whether a file is taken as an image.
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "WEBP": (".webp",),
}
IMAGE_EXTENSIONS = tuple(extension for extensions in FORMAT_EXTENSIONS.values() for extension in extensions)
_FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
SUPPORTED_FORMATS = ", ".join(
    f"{_FORMAT_NAMES[name]} ({', '.join(extensions)})" for name, extensions in FORMAT_EXTENSIONS.items()
)  # "PNG (.png), JPEG (.jpg, .jpeg), WebP (.webp)": what messages about formats say
# Extensions of image formats loraflow does not read: where an image would be used, such a file is an
# UNSUPPORTED_FORMAT error, never silently left out (a photo library export must not lose half its images).
# JPEG and PNG under other names (.jfif, .jpe, .apng) are here too: rename them to be read.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {
        *(".apng", ".avif", ".avifs", ".bmp", ".dib", ".gif", ".heic", ".heics", ".heif", ".hif", ".ico"),
        *(".j2k", ".jp2", ".jpe", ".jfif", ".jpf", ".jpx", ".jxl", ".jxr", ".wdp", ".hdp", ".pbm", ".pgm"),
        *(".pnm", ".ppm", ".pcx", ".psd", ".qoi", ".svg", ".tga", ".tif", ".tiff", ".exr", ".hdr", ".dds"),
        # camera raw
        *(".arw", ".cr2", ".cr3", ".crw", ".dng", ".nef", ".nrw", ".orf", ".raf", ".rw2", ".pef", ".srw"),
    }
)
# Order is precedence: when an image has both, the ``.txt`` caption is used.
CAPTION_EXTENSIONS = (".txt", ".caption")
CONFIG_EXTENSION = ".toml"
REG_FOLDER = "reg"  # holds the regularization subsets
METADATA_FILE = "metadata.jsonl"  # Hugging Face imagefolder captions
FOLDER_FORM = "<repeats>_<trigger>[ <class>] (e.g. '60_dwjz' or '20_zqxj dog')"
REG_FOLDER_FORM = f"{REG_FOLDER}/<repeats>_<class> (e.g. '{REG_FOLDER}/1_dog')"
MAX_PREVIEW_PROMPTS = 8
PROMPT_TEMPLATES = (
    "a photo of {subject}",
    "{subject}, portrait, high quality",
    "{subject} in a sunny garden, detailed",
    "a painting of {subject}",
)
_JUNK_FOLDERS = frozenset({"__MACOSX"})  # macOS zip residue
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class FileKind(StrEnum):
    CONFIG = "config"
    IMAGE = "image"
    UNSUPPORTED_IMAGE = "unsupported_image"  # an image loraflow does not read, where an image would be used
    CAPTION = "caption"
    METADATA = "metadata"  # a subset folder's metadata.jsonl
    UNEXPECTED = "unexpected"


class Subset(BaseModel):
    """A subset folder: its images are seen ``repeats`` times per epoch.

    ``folder`` is the path from the dataset root (``60_dwjz``, ``reg/1_dog``). A regularization
    subset's name reads the same way: its caption words (kohya's class tokens) follow the ``_``.
    """

    folder: str
    repeats: int
    trigger: str
    class_name: str | None = None
    is_reg: bool = False

    @property
    def default_caption(self) -> str:
        """Caption for images without a caption file (kohya's folder-name caption)."""
        return f"{self.trigger} {self.class_name}" if self.class_name else self.trigger


def parse_subset_folder(folder: str, max_repeats: int = 1000) -> Subset:
    """Parse ``<repeats>_<trigger>[ <class>]`` or ``reg/<repeats>_<class>``; raises BAD_FOLDER_NAME."""
    is_reg = folder.startswith(f"{REG_FOLDER}/")
    name = folder.removeprefix(f"{REG_FOLDER}/")
    form = REG_FOLDER_FORM if is_reg else FOLDER_FORM

    def bad(reason: str) -> LoraflowError:
        return LoraflowError(
            ErrorCode.BAD_FOLDER_NAME, f"folder {folder!r} {reason}; expected {form}", folder
        )

    repeats_text, underscore, caption = name.partition("_")
    if not underscore:
        raise bad("has no '_' between the repeat count and the trigger word")
    if not re.fullmatch(r"[0-9]+", repeats_text):
        raise bad(f"does not start with a repeat count ({repeats_text!r} is not a whole number)")
    repeats = int(repeats_text)
    if not 1 <= repeats <= max_repeats:
        raise bad(f"has repeat count {repeats}, which must be between 1 and {max_repeats}")
    if not caption or caption[0].isspace():
        raise bad("has no trigger word after the '_'")
    parts = caption.split(maxsplit=1)
    trigger = parts[0]
    class_name = parts[1].strip() if len(parts) > 1 else None
    if class_name is None and caption != trigger:
        raise bad("has a space after the trigger word but no class name")
    return Subset(folder=folder, repeats=repeats, trigger=trigger, class_name=class_name, is_reg=is_reg)


def dataset_id(key: str) -> str:
    """The dataset a bucket key belongs to: its top-level prefix."""
    top, slash, _ = key.partition("/")
    if not slash or not top:
        raise LoraflowError(ErrorCode.UNSAFE_KEY, "object is not inside a dataset folder", key)
    return top


def relative_path(dataset: str, key: str) -> str:
    """A bucket key relative to its dataset root (``ds/60_a/x.png`` -> ``60_a/x.png``)."""
    prefix = f"{dataset}/"
    if not key.startswith(prefix):
        raise LoraflowError(ErrorCode.UNSAFE_KEY, f"object is outside dataset {dataset!r}", key)
    return key[len(prefix) :]


def check_key_safe(rel_path: str) -> None:
    """Reject paths that could escape the dataset or confuse a filesystem when downloaded."""
    reason = _unsafe_reason(rel_path)
    if reason:
        raise LoraflowError(ErrorCode.UNSAFE_KEY, f"unsafe object key {rel_path!r}: {reason}", rel_path)


def _unsafe_reason(rel_path: str) -> str | None:
    if not rel_path:
        return "empty path"
    if _CONTROL_CHARS.search(rel_path):
        return "contains control characters"
    if "\\" in rel_path:
        return "contains a backslash"
    if rel_path.startswith("/"):
        return "starts with '/'"
    segments = rel_path.split("/")
    if any(segment in (".", "..") for segment in segments):
        return "contains a '.' or '..' segment"
    if any(not segment for segment in segments):
        return "contains an empty segment ('//' or a trailing '/')"
    return None


def is_unsupported_image(rel_path: str) -> bool:
    """Whether the name's extension is that of an image format loraflow does not read."""
    return extension_of(rel_path) in UNSUPPORTED_IMAGE_EXTENSIONS


def is_junk_segment(segment: str) -> bool:
    """Hidden files/folders (``.DS_Store``, ``.git``) and macOS zip residue."""
    return segment.startswith(".") or segment in _JUNK_FOLDERS


def extension_of(rel_path: str) -> str:
    """Lower-cased extension including the dot ("" if none)."""
    return posixpath.splitext(rel_path)[1].lower()


def stem_of(rel_path: str) -> str:
    """The path without its extension: an image and its caption share it."""
    return posixpath.splitext(rel_path)[0]


def classify(rel_path: str) -> FileKind:
    """What a file is, from where it sits and its name (content is checked elsewhere)."""
    segments = rel_path.split("/")
    if any(is_junk_segment(segment) for segment in segments):
        return FileKind.UNEXPECTED
    extension = extension_of(rel_path)
    if len(segments) == 1:
        return FileKind.CONFIG if extension == CONFIG_EXTENSION else FileKind.UNEXPECTED
    folder = subset_folder_of(rel_path)
    if folder is None or len(segments) != folder.count("/") + 2:  # not directly inside its folder
        return FileKind.UNEXPECTED
    if segments[-1] == METADATA_FILE:
        return FileKind.METADATA
    if extension in IMAGE_EXTENSIONS:
        return FileKind.IMAGE
    if extension in UNSUPPORTED_IMAGE_EXTENSIONS:
        return FileKind.UNSUPPORTED_IMAGE
    if extension in CAPTION_EXTENSIONS:
        return FileKind.CAPTION
    return FileKind.UNEXPECTED


def subset_folder_of(rel_path: str) -> str | None:
    """The subset folder a path lies in (``60_a``, ``reg/1_dog``), if any.

    None at the root, in junk folders, and for files directly inside ``reg/``.
    """
    segments = rel_path.split("/")
    top = segments[0]
    if len(segments) < 2 or not top or is_junk_segment(top):
        return None
    if top != REG_FOLDER:
        return top
    if len(segments) < 3 or not segments[1] or is_junk_segment(segments[1]):
        return None
    return f"{REG_FOLDER}/{segments[1]}"


class CaptionSource(BaseModel):
    """Where an image's caption comes from.

    ``metadata``: the image's line in ``path`` (a ``metadata.jsonl``), or the folder-name caption
    when the file has no line for it; ``file``: the caption file ``path``; ``folder_name``: the
    subset's ``default_caption``.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["metadata", "file", "folder_name"]
    path: str | None = None


class SubsetFiles(BaseModel):
    """The files directly inside one subset folder, with captions matched to images."""

    folder: str  # from the dataset root: "60_dwjz", "reg/1_dog"
    is_reg: bool = False
    images: list[str] = Field(default_factory=list)
    unsupported_images: list[str] = Field(default_factory=list)  # UNSUPPORTED_IMAGE_EXTENSIONS files
    metadata_file: str | None = None  # "<folder>/metadata.jsonl": its captions win over caption files
    captions: dict[str, str] = Field(default_factory=dict)  # image path -> caption file used
    orphan_captions: list[str] = Field(default_factory=list)  # no image with the same stem
    shadowed_captions: dict[str, str] = Field(default_factory=dict)  # unused caption -> file used instead

    def caption_for(self, image: str) -> str | None:
        """The caption file used for ``image`` (never one shadowed by ``metadata.jsonl``)."""
        return self.captions.get(image)

    def caption_source(self, image: str) -> CaptionSource:
        if self.metadata_file is not None:
            return CaptionSource(kind="metadata", path=self.metadata_file)
        caption_file = self.captions.get(image)
        if caption_file is not None:
            return CaptionSource(kind="file", path=caption_file)
        return CaptionSource(kind="folder_name")


class DatasetFiles(BaseModel):
    """A dataset's files sorted by role; every subset folder (training and reg) is in ``folders``."""

    config_files: list[str] = Field(default_factory=list)
    folders: dict[str, SubsetFiles] = Field(default_factory=dict)
    unexpected: list[str] = Field(default_factory=list)

    @property
    def images(self) -> list[str]:
        """Every image directly inside a top-level folder, sorted."""
        return sorted(image for files in self.folders.values() for image in files.images)

    @property
    def unsupported_images(self) -> list[str]:
        """Every file in an image's place whose extension names a format loraflow does not read, sorted."""
        return sorted(path for files in self.folders.values() for path in files.unsupported_images)

    @property
    def used_captions(self) -> list[str]:
        """Every caption file matched to an image, sorted."""
        return sorted({caption for files in self.folders.values() for caption in files.captions.values()})

    @property
    def image_count(self) -> int:
        return sum(len(files.images) for files in self.folders.values())

    @property
    def train_folders(self) -> list[SubsetFiles]:
        return [files for files in self.folders.values() if not files.is_reg]

    @property
    def reg_folders(self) -> list[SubsetFiles]:
        return [files for files in self.folders.values() if files.is_reg]

    @property
    def train_image_count(self) -> int:
        return sum(len(files.images) for files in self.train_folders)

    @property
    def reg_image_count(self) -> int:
        return sum(len(files.images) for files in self.reg_folders)


def group_files(rel_paths: Iterable[str]) -> DatasetFiles:
    """Sort relative paths into config, subset folders (images, captions, metadata) and the rest.

    Paths ending in ``/`` are folder markers (S3 console "Create folder"): they only register
    their folder. Works the same on an S3 listing and on a local directory walk.
    """
    result = DatasetFiles()
    captions_by_folder: dict[str, list[str]] = {}
    for rel_path in sorted(rel_paths):
        folder = subset_folder_of(rel_path)
        if folder is not None and folder not in result.folders:
            is_reg = folder.startswith(f"{REG_FOLDER}/")
            result.folders[folder] = SubsetFiles(folder=folder, is_reg=is_reg)
        if rel_path.endswith("/"):
            continue
        kind = classify(rel_path)
        if kind is FileKind.CONFIG:
            result.config_files.append(rel_path)
        elif kind is FileKind.IMAGE and folder is not None:
            result.folders[folder].images.append(rel_path)
        elif kind is FileKind.UNSUPPORTED_IMAGE and folder is not None:
            result.folders[folder].unsupported_images.append(rel_path)
        elif kind is FileKind.CAPTION and folder is not None:
            captions_by_folder.setdefault(folder, []).append(rel_path)
        elif kind is FileKind.METADATA and folder is not None:
            result.folders[folder].metadata_file = rel_path
        else:
            result.unexpected.append(rel_path)
    for folder, captions in captions_by_folder.items():
        _match_captions(result.folders[folder], captions)
    return result


def _match_captions(files: SubsetFiles, captions: Sequence[str]) -> None:
    if files.metadata_file is not None:  # metadata.jsonl wins: no caption file is used
        files.shadowed_captions = dict.fromkeys(captions, files.metadata_file)
        return
    precedence = {extension: rank for rank, extension in enumerate(CAPTION_EXTENSIONS)}
    best_by_stem: dict[str, str] = {}
    for caption in sorted(captions, key=lambda path: precedence[extension_of(path)]):
        stem = stem_of(caption)
        if stem in best_by_stem:
            files.shadowed_captions[caption] = best_by_stem[stem]
        else:
            best_by_stem[stem] = caption
    image_stems = set()
    for image in files.images:
        image_stems.add(stem_of(image))
        if stem_of(image) in best_by_stem:
            files.captions[image] = best_by_stem[stem_of(image)]
    files.orphan_captions = sorted(path for stem, path in best_by_stem.items() if stem not in image_stems)


def default_preview_prompts(subsets: Sequence[Subset]) -> list[str]:
    """A few preview prompts built from each training subset's trigger and class, at most 8, no repeats."""
    prompts: list[str] = []
    for template in PROMPT_TEMPLATES:
        for subset in (subset for subset in subsets if not subset.is_reg):
            prompt = template.format(subject=subset.default_caption)
            if prompt not in prompts:
                prompts.append(prompt)
    return prompts[:MAX_PREVIEW_PROMPTS]
