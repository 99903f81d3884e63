"""The kohya-compatible training config (``<dataset>/*.toml``).

kohya's ``--config_file`` TOMLs are flat or grouped in tables (``[model_arguments]``,
``[training_arguments]``, ...) that kohya flattens one level deep; we do the same. Our own settings
live in the ``[loraflow]`` table. Keys we do not honour are accepted and reported as ignored.
Honouring another kohya key is one field on ``TrainingConfig``.
"""

import tomllib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraflow_shared.errors import ErrorCode, Problem, ValidationFailed

LORAFLOW_TABLE = "loraflow"

Prompt = Annotated[str, Field(min_length=1, max_length=1000)]
ImageSide = Annotated[int, Field(ge=64, le=4096, multiple_of=8)]
RESOLUTION_FORMS = 'an integer like 512, or a string like "512" or "768,512" (width,height)'


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

    pretrained_model_name_or_path: Annotated[str, Field(min_length=1)] | None = None
    resolution: tuple[ImageSide, ImageSide] = (512, 512)  # (width, height)
    network_dim: Annotated[int, Field(ge=1, le=1024)] = 16
    network_alpha: Annotated[float, Field(gt=0, le=1024)] = 8
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-4
    max_train_steps: Annotated[int, Field(ge=1, le=100_000)] = 1600
    train_batch_size: Annotated[int, Field(ge=1, le=64)] = 1
    seed: Annotated[int, Field(ge=0)] = 42
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
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
        problems += [invalid(_describe_error(error)) for error in exc.errors()]
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


def _is_array_of_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"}
_SIDE_NAMES = ("width", "height")


def _describe_error(error: Any) -> str:
    """Turn one pydantic error into ``<key>: <rule>, got <value>``."""
    loc = tuple(error["loc"])
    if error["type"] in _RANGE_ERRORS:
        rule = _range_rule(_schema_at(loc)) or error["msg"]
    elif error["type"] == "string_pattern_mismatch" and "description" in _schema_at(loc):
        rule = f"must be {_schema_at(loc)['description']}"
    elif error["type"] == "extra_forbidden":
        known = ", ".join(LoraflowSettings.model_fields)
        rule = f"unknown [{LORAFLOW_TABLE}] setting (known: {known})"
    else:
        rule = str(error["msg"]).removeprefix("Value error, ")
        rule = rule[:1].lower() + rule[1:]
    got = f" ({error['input']!r})" if "got " in rule else f", got {error['input']!r}"
    return f"{_key_name(loc)}: {rule}{got}"


def _key_name(loc: tuple[Any, ...]) -> str:
    if len(loc) == 2 and loc[0] == "resolution" and loc[1] in (0, 1):
        return f"resolution ({_SIDE_NAMES[loc[1]]})"
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _schema_at(loc: tuple[Any, ...]) -> dict[str, Any]:
    """The JSON schema of the value at ``loc``, as pydantic describes the model."""
    root = TrainingConfig.model_json_schema()
    definitions = root.get("$defs", {})
    node: dict[str, Any] = root
    for part in loc:
        node = _resolve(node, definitions)
        if isinstance(part, int):
            items = node.get("prefixItems") or [node.get("items", {})] * (part + 1)
            node = items[part] if part < len(items) else {}
        else:
            node = node.get("properties", {}).get(part, {})
    return _resolve(node, definitions)


def _resolve(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        node = definitions[node["$ref"].rsplit("/", 1)[-1]]
    for option in node.get("anyOf", []):  # Optional[X]: the non-null branch carries the rules
        if option.get("type") != "null":
            return _resolve(option, definitions)
    return node


def _range_rule(schema: dict[str, Any]) -> str | None:
    low, high = schema.get("minimum"), schema.get("maximum")
    low_open = schema.get("exclusiveMinimum")
    if low is not None and high is not None:
        rule = f"must be between {low:g} and {high:g}"
    elif low_open is not None and high is not None:
        rule = f"must be greater than {low_open:g} and at most {high:g}"
    elif low is not None:
        rule = f"must be at least {low:g}"
    elif low_open is not None:
        rule = f"must be greater than {low_open:g}"
    elif high is not None:
        rule = f"must be at most {high:g}"
    else:
        rule = ""
    step = schema.get("multipleOf")
    if step is not None:
        rule = f"{rule} and a multiple of {step:g}" if rule else f"must be a multiple of {step:g}"
    return rule or None
