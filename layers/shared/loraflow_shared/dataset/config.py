"""The kohya-compatible training config (``<dataset>/*.toml``).

kohya's ``--config_file`` TOMLs are flat or grouped in tables (``[model_arguments]``,
``[training_arguments]``, ...) that kohya flattens one level deep; we do the same. Our own settings
live in the ``[loraflow]`` table. Keys we do not honour are accepted and reported as ignored.
Honouring another kohya key is one field on ``TrainingConfig``. ``None`` on a field means "not
pinned": the trainer's memory plan (or model detection) decides.
"""

import math
import tomllib
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from loraflow_shared.dataset import config_rules
from loraflow_shared.dataset.config_messages import CONFLICT_ERROR, LORAFLOW_TABLE, describe_errors
from loraflow_shared.errors import ErrorCode, Problem, ValidationFailed

Prompt = Annotated[str, Field(min_length=1, max_length=1000)]
ImageSide = Annotated[int, Field(ge=64, le=4096, multiple_of=8)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
RESOLUTION_FORMS = 'an integer like 512, or a string like "512" or "768,512" (width,height)'

Optimizer = Literal["AdamW", "AdamW8bit", "Adafactor"]
OPTIMIZERS: tuple[Optimizer, ...] = ("AdamW", "AdamW8bit", "Adafactor")
LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


class LoraflowSettings(BaseModel):
    """The ``[loraflow]`` table: preview rendering after training."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    preview_prompts: Annotated[list[Prompt], Field(min_length=1, max_length=8)] | None = None
    preview_steps: Annotated[int, Field(ge=1, le=150)] = 20
    preview_resolution: Annotated[int, Field(ge=64, le=2048, multiple_of=8)] | None = None
    preview_seed: Annotated[int, Field(ge=0)] = 0


class TrainingConfig(BaseModel):
    """The kohya keys loraflow honours (flattened), plus the ``[loraflow]`` table."""

    model_config = ConfigDict(extra="forbid")

    # model
    pretrained_model_name_or_path: Annotated[str, Field(min_length=1)] | None = None
    sdxl: bool | None = None  # None: detected from the model
    clip_skip: Annotated[int, Field(ge=1, le=12)] | None = None  # SD 1.x only, as kohya
    # network
    network_dim: Annotated[int, Field(ge=1, le=1024)] = 16
    network_alpha: Annotated[float, Field(gt=0, le=1024)] = 8
    network_train_unet_only: bool | None = None
    # steps and batches
    resolution: tuple[ImageSide, ImageSide] = (512, 512)  # (width, height)
    max_train_steps: Annotated[int, Field(ge=1, le=100_000)] = 1600
    max_train_epochs: Annotated[int, Field(ge=1, le=10_000)] | None = None  # overrides max_train_steps
    train_batch_size: Annotated[int, Field(ge=1, le=64)] | None = None
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1024)] = 1
    seed: Annotated[int, Field(ge=0)] = 42
    save_every_n_steps: Annotated[int, Field(ge=1, le=100_000)] | None = None
    # optimizer and schedule
    learning_rate: LearningRate = 1e-4
    unet_lr: LearningRate | None = None
    text_encoder_lr: LearningRate | None = None
    optimizer_type: Optimizer | None = None
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int | float = 0  # steps, or a fraction of the total steps when a float < 1
    lr_scheduler_num_cycles: Annotated[int, Field(ge=1, le=1000)] = 1
    lr_scheduler_power: Annotated[float, Field(gt=0, le=10)] = 1.0
    max_grad_norm: Annotated[float, Field(ge=0, le=1000)] = 1.0  # 0 disables clipping
    # loss
    noise_offset: Annotated[float, Field(ge=0, le=1)] | None = None
    min_snr_gamma: Annotated[float, Field(gt=0, le=20)] | None = None
    prior_loss_weight: Annotated[float, Field(ge=0, le=100)] = 1.0
    # memory and precision
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool | None = None
    cache_latents: bool | None = None
    # captions and augmentation
    shuffle_caption: bool = False
    keep_tokens: Annotated[int, Field(ge=0, le=75)] = 0
    caption_separator: Annotated[str, Field(min_length=1, max_length=8)] = ","
    caption_dropout_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    flip_aug: bool = False
    # aspect-ratio buckets
    enable_bucket: bool = False
    min_bucket_reso: ImageSide = 256
    max_bucket_reso: ImageSide = 1024
    bucket_reso_steps: Annotated[int, Field(ge=8, le=1024, multiple_of=8)] = 64
    bucket_no_upscale: bool = False
    # outputs
    output_name: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$",
            description="a file name of 1-100 letters, digits, '.', '_' or '-', not starting with '.'",
        ),
    ] = "lora"
    loraflow: LoraflowSettings = Field(default_factory=LoraflowSettings)

    @field_validator("resolution", mode="before")
    @classmethod
    def _kohya_resolution(cls, value: Any) -> Any:
        """kohya writes resolution as 512, "512" or "width,height"."""
        if isinstance(value, bool):
            raise ValueError(f"expected {RESOLUTION_FORMS}")
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, str):
            parts = [part.strip() for part in value.split(",")]
            if len(parts) not in (1, 2) or not all(part.isdigit() for part in parts):
                raise ValueError(f"expected {RESOLUTION_FORMS}")
            sides = [int(part) for part in parts]
            return (sides[0], sides[-1])
        if isinstance(value, list | tuple) and len(value) == 1:
            return (value[0], value[0])
        return value

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _any_case_optimizer(cls, value: Any) -> Any:
        """kohya configs write "adamw8bit" as often as "AdamW8bit"; "" is kohya's "default"."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            return None
        by_lower = {name.lower(): name for name in OPTIMIZERS}
        if value.strip().lower() not in by_lower:
            raise ValueError("must be one of 'AdamW', 'AdamW8bit' or 'Adafactor' (any case)")
        return by_lower[value.strip().lower()]

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _lower_case_scheduler(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("lr_warmup_steps", mode="before")
    @classmethod
    def _warmup_number(cls, value: Any) -> Any:
        """One clear message for a non-number (the int | float union would report two)."""
        if isinstance(value, str):
            text = value.strip()
            value = int(text) if text.isdigit() else _float_or_none(text)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a step count (integer) or a fraction of the total steps (0 to <1)")
        return value

    @field_validator("lr_warmup_steps")
    @classmethod
    def _warmup_steps_or_fraction(cls, value: int | float) -> int | float:
        """kohya: an integer is a step count, a float is a fraction of the total steps."""
        if isinstance(value, float) and not 0 <= value < 1:
            raise ValueError(
                "a float is a fraction of the total steps and must be at least 0 and less than 1 "
                "(write a whole number for a step count)"
            )
        if isinstance(value, int) and not 0 <= value <= 100_000:
            raise ValueError("a step count must be between 0 and 100000")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = config_rules.conflicts(self)
        if problems:
            context = {"summary": "; ".join(problems), "problems": problems}
            raise PydanticCustomError(CONFLICT_ERROR, "{summary}", context)
        return self

    @property
    def width(self) -> int:
        return self.resolution[0]

    @property
    def height(self) -> int:
        return self.resolution[1]

    @property
    def preview_size(self) -> tuple[int, int]:
        """(width, height) of previews: ``[loraflow] preview_resolution`` or the training size."""
        side = self.loraflow.preview_resolution
        return (side, side) if side else self.resolution

    @property
    def unet_learning_rate(self) -> float:
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps to run: ``max_train_epochs`` wins over ``max_train_steps``, as in kohya.

        ``batches_per_epoch``: batches one process draws per epoch (with buckets, the sum over
        buckets of ceil(images / batch size)).
        """
        if self.max_train_epochs is None:
            return self.max_train_steps
        per_epoch = math.ceil(max(batches_per_epoch, 1) / self.gradient_accumulation_steps)
        return self.max_train_epochs * per_epoch

    def warmup_steps(self, total_steps: int) -> int:
        """``lr_warmup_steps`` in steps: a float is a fraction of ``total_steps`` (kohya's rule)."""
        if isinstance(self.lr_warmup_steps, float):
            return int(self.lr_warmup_steps * total_steps)
        return min(self.lr_warmup_steps, total_steps)


class ParsedConfig(BaseModel):
    config: TrainingConfig
    ignored_keys: list[str]


def parse_config(text: bytes, path: str) -> ParsedConfig:
    """Parse a kohya TOML; raises ``ValidationFailed`` with one INVALID_CONFIG problem per bad key."""

    def invalid(message: str) -> Problem:
        return Problem(code=ErrorCode.INVALID_CONFIG, path=path, message=message)

    try:
        document = tomllib.loads(text.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        message = f"config is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ValidationFailed([invalid(message)]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValidationFailed([invalid(f"config is not valid TOML: {exc}")]) from exc
    flat, ignored, conflicts = _flatten(document)
    problems = [invalid(message) for message in conflicts]
    try:
        config = TrainingConfig.model_validate(flat)
    except ValidationError as exc:
        problems += [invalid(message) for message in describe_errors(TrainingConfig, exc.errors())]
        config = None
    if problems or config is None:
        raise ValidationFailed(problems)
    return ParsedConfig(config=config, ignored_keys=ignored)


def ignored_key_warnings(parsed: ParsedConfig, path: str) -> list[Problem]:
    return [
        Problem(
            code=ErrorCode.IGNORED_CONFIG_KEY,
            path=path,
            message=f"{key}: not used by loraflow, ignored",
        )
        for key in parsed.ignored_keys
    ]


def config_warnings(parsed: ParsedConfig, path: str) -> list[Problem]:
    """Every warning about an accepted config: ignored keys, then keys other keys make moot."""
    moot = [
        Problem(code=ErrorCode.SETTING_ADJUSTED, path=path, message=message)
        for _key, message in config_rules.moot_settings(parsed.config)
    ]
    return ignored_key_warnings(parsed, path) + moot


def _flatten(document: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """kohya's one-level flattening. Returns (honoured keys, ignored keys, conflict messages)."""
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    ignored: set[str] = set()
    conflicts: list[str] = []

    def put(key: str, value: Any, where: str) -> None:
        if key in flat and flat[key] != value:
            conflicts.append(
                f"{key}: set twice with different values ({origin[key]}: {flat[key]!r}, {where}: {value!r})"
            )
        flat[key], origin[key] = value, where

    for key, value in document.items():
        if key == LORAFLOW_TABLE:
            put(key, value, f"[{key}]")
        elif _is_array_of_tables(value):
            ignored.add(key)  # e.g. [[datasets]]: kohya's dataset config, the folders define ours
        elif isinstance(value, dict):
            for inner_key, inner_value in value.items():
                put(inner_key, inner_value, f"[{key}]")
        else:
            put(key, value, "the top level")
    ignored.update(key for key in flat if key not in TrainingConfig.model_fields)
    honoured = {key: value for key, value in flat.items() if key in TrainingConfig.model_fields}
    return honoured, sorted(ignored), conflicts


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _is_array_of_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)
