"""Turn pydantic's errors on a ``TrainingConfig`` into ``<key>: <rule>, got <value>`` messages.

The rule text comes from the model's own JSON schema (bounds, multiples, descriptions), so a bound
is written once, on the field, and every message about it stays true.
"""

from functools import cache
from typing import Any

from pydantic import BaseModel

LORAFLOW_TABLE = "loraflow"
CONFLICT_ERROR = "config_conflict"  # a cross-field rule; its messages travel in ctx["problems"]

# Problems land in the job record (DynamoDB items are at most 400 KB) and in notifications (SNS messages at
# most 256 KB): a value or key quoted in a message is cut to this length.
MAX_SHOWN_CHARS = 100
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of"}
_SIDE_NAMES = ("width", "height")


def describe_errors(model: type[BaseModel], errors: list[Any]) -> list[str]:
    """One message per pydantic error; a cross-field error carries several."""
    messages: list[str] = []
    for error in errors:
        if error["type"] == CONFLICT_ERROR:
            messages += list(error["ctx"]["problems"])
        else:
            messages.append(_describe_error(model, error))
    return messages


def _describe_error(model: type[BaseModel], error: Any) -> str:
    loc = tuple(error["loc"])
    schema = _schema_at(model, loc)
    if error["type"] in _RANGE_ERRORS:
        rule = _range_rule(schema) or error["msg"]
    elif error["type"] == "string_pattern_mismatch" and "description" in schema:
        rule = f"must be {schema['description']}"
    elif error["type"] == "extra_forbidden":
        rule = _unknown_key_rule(model, loc)
    else:
        rule = str(error["msg"]).removeprefix("Value error, ")
        rule = rule[:1].lower() + rule[1:]
    shown = shown_value(error["input"])
    got = f" ({shown})" if "got " in rule else f", got {shown}"
    return f"{_key_name(loc)}: {rule}{got}"


def shown_value(value: Any) -> str:
    """``repr(value)`` as a message quotes it (cut to ``MAX_SHOWN_CHARS``)."""
    return cut(repr(value))


def cut(text: str) -> str:
    """``text`` cut to ``MAX_SHOWN_CHARS``: a problem's message is stored in the job record."""
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[: MAX_SHOWN_CHARS - 3]}..."


def _unknown_key_rule(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """A key the model does not define, with the keys it does (a config's `[table]`, or a top-level key)."""
    known = ", ".join(_schema_at(model, loc[:-1]).get("properties", {}))
    where = f"[{loc[-2]}] setting" if len(loc) > 1 else "key"
    return f"unknown {where} (known: {known})"


def _key_name(loc: tuple[Any, ...]) -> str:
    # A union (e.g. int | float) adds the branch name to the location: drop it.
    loc = tuple(part for part in loc if part not in ("int", "float"))
    if len(loc) == 2 and loc[0] == "resolution" and loc[1] in (0, 1):
        return f"resolution ({_SIDE_NAMES[loc[1]]})"
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _schema_at(model: type[BaseModel], loc: tuple[Any, ...]) -> dict[str, Any]:
    """The JSON schema of the value at ``loc``, as pydantic describes the model."""
    root = _model_schema(model)
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


@cache
def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Built once per model (13 ms for TrainingConfig): a config with thousands of bad keys stays fast."""
    return model.model_json_schema()


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
        rule = f"must be between {_number(low)} and {_number(high)}"
    elif low_open is not None and high is not None:
        rule = f"must be greater than {_number(low_open)} and at most {_number(high)}"
    elif low is not None:
        rule = f"must be at least {_number(low)}"
    elif low_open is not None:
        rule = f"must be greater than {_number(low_open)}"
    elif high is not None:
        rule = f"must be at most {_number(high)}"
    else:
        rule = ""
    step = schema.get("multipleOf")
    if step is not None:
        multiple = f"a multiple of {_number(step)}"
        rule = f"{rule} and {multiple}" if rule else f"must be {multiple}"
    return rule or None


def _number(value: float) -> str:
    """A bound as written in a config: whole numbers in full (4294967295, not 4.29497e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
