"""Error codes and domain exceptions shared by every loraflow component.

A problem is reported as ``{code, path, message}``: ``path`` is relative to the dataset root
(``60_dwjz/img1.png``, ``kohya-sdxl-config.toml``) or "" when it concerns the whole dataset or job.
Mapping exceptions to HTTP statuses or state-machine errors happens in one place per component.
"""

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    # dataset rejection (validation errors)
    INVALID_CONFIG = "INVALID_CONFIG"
    NO_ASSET_FOLDER = "NO_ASSET_FOLDER"
    BAD_FOLDER_NAME = "BAD_FOLDER_NAME"
    TOO_FEW_IMAGES = "TOO_FEW_IMAGES"
    TOO_MANY_IMAGES = "TOO_MANY_IMAGES"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    UNREADABLE_IMAGE = "UNREADABLE_IMAGE"
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    FILE_TOO_LARGE = "FILE_TOO_LARGE"
    BAD_CAPTION = "BAD_CAPTION"
    UNSAFE_KEY = "UNSAFE_KEY"
    # dataset warnings (accepted anyway)
    ORPHAN_CAPTION = "ORPHAN_CAPTION"
    UNEXPECTED_FILE = "UNEXPECTED_FILE"
    DUPLICATE_IMAGE = "DUPLICATE_IMAGE"
    IGNORED_CONFIG_KEY = "IGNORED_CONFIG_KEY"
    EXTENSION_MISMATCH = "EXTENSION_MISMATCH"
    # training warnings (the LoRA is delivered anyway)
    WEAK_LORA = "WEAK_LORA"  # its effect on the training prompts is negligible
    SETTING_ADJUSTED = "SETTING_ADJUSTED"  # e.g. AdamW8bit without CUDA/bitsandbytes fell back to AdamW
    # job failures after acceptance
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    TRAINING_FAILED = "TRAINING_FAILED"
    PREVIEW_FAILED = "PREVIEW_FAILED"
    NAN_LOSS = "NAN_LOSS"  # non-finite loss: training stopped, no LoRA delivered
    OUT_OF_MEMORY = "OUT_OF_MEMORY"  # the message carries the memory plan that was tried
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # why a job was cancelled
    CANCELLED = "CANCELLED"  # by a user's request (POST /jobs/{job_id}/cancel)
    SUPERSEDED = "SUPERSEDED"  # a newer version of its dataset arrived before it finished
    # API
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    BAD_REQUEST = "BAD_REQUEST"
    JOB_STATE_CONFLICT = "JOB_STATE_CONFLICT"  # e.g. cancelling a job that already ended
    GENERATION_NOT_FOUND = "GENERATION_NOT_FOUND"
    # A job already has as many generations waiting as it may (the endpoint's queue is shared with previews)
    TOO_MANY_GENERATIONS = "TOO_MANY_GENERATIONS"


# Codes reported as warnings: the dataset is accepted anyway.
WARNING_CODES = frozenset(
    {
        ErrorCode.ORPHAN_CAPTION,
        ErrorCode.UNEXPECTED_FILE,
        ErrorCode.DUPLICATE_IMAGE,
        ErrorCode.IGNORED_CONFIG_KEY,
        ErrorCode.EXTENSION_MISMATCH,
        ErrorCode.WEAK_LORA,
        ErrorCode.SETTING_ADJUSTED,
    }
)


class Problem(BaseModel):
    """One item of a job's ``errors`` or ``warnings`` list."""

    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    path: str
    message: str

    @property
    def is_warning(self) -> bool:
        return self.code in WARNING_CODES


class LoraflowError(Exception):
    """A domain failure with a code; raised with ``from exc`` when it wraps another error."""

    def __init__(self, code: ErrorCode, message: str, path: str = "") -> None:
        super().__init__(f"{code}: {path + ': ' if path else ''}{message}")
        self.code = code
        self.message = message
        self.path = path

    def to_problem(self) -> Problem:
        return Problem(code=self.code, path=self.path, message=self.message)


class ValidationFailed(LoraflowError):
    """Several problems found at once (e.g. every bad key of a config file)."""

    def __init__(self, problems: list[Problem]) -> None:
        if not problems:
            raise ValueError("ValidationFailed needs at least one problem")
        first = problems[0]
        summary = first.message if len(problems) == 1 else f"{first.message} (and {len(problems) - 1} more)"
        super().__init__(first.code, summary, first.path)
        self.problems = list(problems)


def problems_of(error: LoraflowError) -> list[Problem]:
    """Every problem an error carries, whether it is a single one or a ``ValidationFailed``."""
    if isinstance(error, ValidationFailed):
        return list(error.problems)
    return [error.to_problem()]
