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
from loraflow_shared.dataset.config_messages import (
    CONFLICT_ERROR,
    LORAFLOW_TABLE,
    cut,
    describe_errors,
    shown_value,
)
from loraflow_shared.dataset.config_rules import MAX_PREVIEW_SIDE
from loraflow_shared.dataset.layout import MAX_PREVIEW_PROMPTS
from loraflow_shared.errors import ErrorCode, Problem, ValidationFailed

# Every bound below is what a consumer of the value accepts (the trainer, torch/numpy seeding, the renderer,
# DynamoDB, SageMaker), so an accepted config never fails later for being out of range. Floats are finite
# everywhere (``allow_inf_nan=False``): NaN and inf train nothing and DynamoDB refuses them.

# A CLIP prompt is cut at 77 tokens; 1000 characters is generous and keeps 8 prompts far inside a DynamoDB
# item (400 KB), where the job record carries them.
Prompt = Annotated[str, Field(min_length=1, max_length=1000)]
# The VAE works on multiples of 8 px; a 4096 px side already needs the largest images validation accepts
# (16.7 megapixels, IMAGE_TOO_LARGE).
ImageSide = Annotated[int, Field(ge=64, le=4096, multiple_of=8)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
# numpy's legacy seeding (``np.random.seed``, which the trainer and accelerate's ``set_seed`` call) takes
# 0..2**32-1; torch's ``manual_seed`` takes up to 2**64-1, so ``seed + i`` (one generator per prompt or
# image) always fits, and the number is exact in DynamoDB (38 digits) and in JSON read by JavaScript (2**53).
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
# The longest base-model reference: an ``s3://`` URI is at most 5 + 63 (bucket) + 1 + 1024 (key) characters.
# It also travels as a SageMaker hyperparameter (values up to 2500 characters) and in the job record.
MAX_MODEL_REF_CHARS = 5 + 63 + 1 + 1024
ModelRef = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_REF_CHARS)]
PreviewPrompts = Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PREVIEW_PROMPTS)]
# Diffusers' schedulers take up to their 1000 training timesteps; past ~150 steps nothing changes in the
# picture. The product with the prompts and the size is bounded by ``preview_budget`` in validation.
PreviewSteps = Annotated[int, Field(ge=1, le=150)]
PreviewSide = Annotated[int, Field(ge=64, le=MAX_PREVIEW_SIDE, multiple_of=8)]
# Classifier-free guidance, or the guidance a guidance-distilled FLUX.1 [dev] embeds; past ~20 nothing is
# ever sampled.
GuidanceScale = Annotated[float, Field(ge=0, le=20)]
RESOLUTION_FORMS = 'an integer like 512, or a string like "512" or "768,512" (width,height)'

Optimizer = Literal["AdamW", "AdamW8bit", "Adafactor"]
OPTIMIZERS: tuple[Optimizer, ...] = ("AdamW", "AdamW8bit", "Adafactor")
LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


class LoraflowSettings(BaseModel):
    """The ``[loraflow]`` table: preview rendering after training."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)

    preview_prompts: PreviewPrompts | None = None
    preview_steps: PreviewSteps = 20
    preview_resolution: PreviewSide | None = None
    preview_seed: Seed = 0  # prompt i renders with preview_seed + i (i < MAX_PREVIEW_PROMPTS)


# kohya's `network_args` conv_alpha when only conv_dim is given (sd-scripts' networks/lora.py).
DEFAULT_CONV_ALPHA = 1.0
NETWORK_ARGS_FORM = 'a list of "name=value" strings, e.g. ["conv_dim=8", "conv_alpha=4"]'


class NetworkArgs(BaseModel):
    """kohya's `network_args` (`["conv_dim=8", "conv_alpha=4"]`): LoRA on the 3x3 convolutions too
    (sd-scripts' LoCon, "LoRA-C3Lier"). Others (LyCORIS' `algo`, dropouts, block weights) are kept as
    extras and reported as ignored."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    # The same bounds as network_dim and network_alpha: the convolutions' rank and alpha.
    conv_dim: Annotated[int, Field(ge=1, le=1024)] | None = None
    conv_alpha: Annotated[float, Field(gt=0, le=1024)] | None = None

    @model_validator(mode="after")
    def _alpha_needs_dim(self) -> Self:
        if self.conv_alpha is not None and self.conv_dim is None:
            raise ValueError("conv_alpha is set without conv_dim: set conv_dim to train the convolutions")
        return self

    @property
    def conv_scale_alpha(self) -> float:
        return self.conv_alpha if self.conv_alpha is not None else DEFAULT_CONV_ALPHA

    @property
    def ignored(self) -> list[str]:
        return sorted(self.model_extra or {})


# Every family `loraflow_diffusion.families` specifies (a test keeps the two lists equal).
ModelFamilyName = Literal["sd15", "sdxl", "flux1", "flux2_klein", "qwen_image", "z_image"]
# How flow-matching training draws t (sd-scripts' `timestep_sampling`): uniform; sigmoid of a normal draw
# times `sigmoid_scale`; that, shifted by `discrete_flow_shift`; or shifted by FLUX's resolution rule.
TimestepSampling = Literal["uniform", "sigmoid", "shift", "flux_shift"]


class TrainingConfig(BaseModel):
    """The kohya keys loraflow honours (flattened), plus the ``[loraflow]`` table."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # model
    pretrained_model_name_or_path: ModelRef | None = None
    sdxl: bool | None = None  # None: detected from the model
    # For a model that cannot be inspected before training (a single file of a new family): its family.
    # A contradiction with the model (or with `sdxl`) fails the job before the weights load.
    model_family: ModelFamilyName | None = None
    # SD 1.x only, as kohya; its CLIP text encoder has 12 layers, so 12 is the deepest skip there is.
    clip_skip: Annotated[int, Field(ge=1, le=12)] | None = None
    # network
    # peft takes any positive rank; past 1024 the adapter outgrows the layers it adapts (320-2048 wide).
    network_dim: Annotated[int, Field(ge=1, le=1024)] = 16
    # The update is scaled by alpha / rank: an alpha above the largest rank only amplifies the learning rate.
    network_alpha: Annotated[float, Field(gt=0, le=1024)] = 8
    network_train_unet_only: bool | None = None
    network_args: NetworkArgs = Field(default_factory=NetworkArgs)
    # steps and batches
    resolution: tuple[ImageSide, ImageSide] = (512, 512)  # (width, height)
    # Step, epoch and batch counts: no consumer has a range limit (Python ints, DynamoDB numbers); these are
    # product limits far past a day of GPU time, so a typo (an extra zero or three) is caught before it bills.
    max_train_steps: Annotated[int, Field(ge=1, le=100_000)] = 1600
    max_train_epochs: Annotated[int, Field(ge=1, le=10_000)] | None = None  # overrides max_train_steps
    train_batch_size: Annotated[int, Field(ge=1, le=64)] | None = None  # per GPU
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1024)] = 1
    seed: Seed = 42
    save_every_n_steps: Annotated[int, Field(ge=1, le=100_000)] | None = None
    # optimizer and schedule
    learning_rate: LearningRate = 1e-4  # Adam-family rates above 1 diverge at once (LoRA uses 1e-5..1e-3)
    unet_lr: LearningRate | None = None
    text_encoder_lr: LearningRate | None = None
    optimizer_type: Optimizer | None = None
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int | float = 0  # steps, or a fraction of the total steps when a float < 1
    # diffusers' schedulers take any positive values; more cycles than ~1000 or a power above 10 is noise.
    lr_scheduler_num_cycles: Annotated[int, Field(ge=1, le=1000)] = 1
    lr_scheduler_power: Annotated[float, Field(gt=0, le=10)] = 1.0
    max_grad_norm: Annotated[float, Field(ge=0, le=1000)] = 1.0  # 0 disables clipping; finite for torch
    # loss
    # noise_offset is a fraction of the noise's unit variance; Min-SNR's paper recommends gamma 5.
    noise_offset: Annotated[float, Field(ge=0, le=1)] | None = None
    min_snr_gamma: Annotated[float, Field(gt=0, le=20)] | None = None
    prior_loss_weight: Annotated[float, Field(ge=0, le=100)] = 1.0  # weights the reg images' loss
    # flow-matching families (FLUX, Qwen-Image, Z-Image), kohya sd-scripts' names; None: the family's default.
    # Guidance-distilled FLUX.1 dev embeds the guidance it trains with.
    guidance_scale: GuidanceScale | None = None
    timestep_sampling: TimestepSampling | None = None
    discrete_flow_shift: Annotated[float, Field(gt=0, le=100)] | None = None  # the "shift" sampling's shift
    sigmoid_scale: Annotated[float, Field(gt=0, le=100)] | None = None  # the "sigmoid" sampling's scale
    # sd-scripts' "raw": the loss compares the prediction with noise - latents (their "additive" and
    # "sigma_scaled" are not offered: they are refused here rather than trained differently).
    model_prediction_type: Literal["raw"] | None = None
    t5xxl_max_token_length: Annotated[int, Field(ge=1, le=512)] | None = None  # T5's own limit: 512
    # FLUX.1: T5 encodes each caption under its attention mask, and the transformer's joint attention
    # ignores T5's padding (sd-scripts' key; its default, off, lets padding take part as FluxPipeline does).
    apply_t5_attn_mask: bool | None = None
    # memory and precision
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # kohya's: the frozen denoiser's weights stored in float8 (e4m3) and upcast on each use (a weight
    # parametrization); the LoRA trains in fp32. None: the memory plan turns it on only
    # when nothing else fits the GPU.
    fp8_base: bool | None = None
    gradient_checkpointing: bool | None = None
    cache_latents: bool | None = None
    # captions and augmentation
    shuffle_caption: bool = False
    keep_tokens: Annotated[int, Field(ge=0, le=75)] = 0  # CLIP's 77 tokens less the start and end tokens
    caption_separator: Annotated[str, Field(min_length=1, max_length=8)] = ","  # ",", "|", " ## ", ...
    caption_dropout_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    flip_aug: bool = False
    # aspect-ratio buckets
    enable_bucket: bool = False
    min_bucket_reso: ImageSide = 256
    max_bucket_reso: ImageSide = 1024
    bucket_reso_steps: Annotated[int, Field(ge=8, le=1024, multiple_of=8)] = 64  # bucket sides stay VAE-sized
    bucket_no_upscale: bool = False
    # outputs: a file name in an S3 key and in every client's LoRA folder
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

    @field_validator("network_args", mode="before")
    @classmethod
    def _kohya_network_args(cls, value: Any) -> Any:
        """kohya writes them as `["conv_dim=8", "conv_alpha=4"]`."""
        if isinstance(value, NetworkArgs | dict):
            return value
        if not isinstance(value, list) or not all(isinstance(item, str) and "=" in item for item in value):
            raise ValueError(f"expected {NETWORK_ARGS_FORM}")
        pairs = [item.split("=", 1) for item in value]
        names = [name.strip() for name, _ in pairs]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"{', '.join(twice)} given more than once")
        return {name: argument.strip() for name, (_, argument) in zip(names, pairs, strict=True)}

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
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
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
    def preview_side(self) -> int:
        """The side of the square previews: the smaller side keeps them at the scale the LoRA learnt."""
        return min(self.preview_size)

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


# A config's problems are listed one per key, so they are few; keys nobody defined (ignored or unknown) are
# not, and every problem is stored in the job record: past these counts the rest is summed up in one line.
MAX_CONFIG_PROBLEMS = 50
MAX_IGNORED_KEY_WARNINGS = 20
_IGNORED = "not used by loraflow, ignored"


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
        raise ValidationFailed(_at_most(MAX_CONFIG_PROBLEMS, problems, "problems in the config"))
    ignored += [f"network_args {name}" for name in config.network_args.ignored]
    return ParsedConfig(config=config, ignored_keys=ignored)


def ignored_key_warnings(parsed: ParsedConfig, path: str) -> list[Problem]:
    warnings = [
        Problem(code=ErrorCode.IGNORED_CONFIG_KEY, path=path, message=f"{cut(key)}: {_IGNORED}")
        for key in parsed.ignored_keys
    ]
    return _at_most(MAX_IGNORED_KEY_WARNINGS, warnings, f"keys {_IGNORED}")


def _at_most(limit: int, problems: list[Problem], what: str) -> list[Problem]:
    """The first ``limit`` problems, and one more that counts the rest (same code and path)."""
    if len(problems) <= limit:
        return problems
    rest = len(problems) - limit
    summary = problems[limit].model_copy(update={"message": f"and {rest} more {what}"})
    return [*problems[:limit], summary]


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
        # Only honoured keys can contradict each other: an ignored key's values are never read.
        if key in flat and flat[key] != value and key in TrainingConfig.model_fields:
            conflicts.append(
                f"{key}: set twice with different values ({cut(origin[key])}: {shown_value(flat[key])}, "
                f"{cut(where)}: {shown_value(value)})"
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
