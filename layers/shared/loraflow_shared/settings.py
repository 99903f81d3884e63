"""Settings read from environment variables once, at cold start, into a validated pydantic model.

Each field `foo_bar` is read from `FOO_BAR`. A missing or malformed variable stops the cold start with
a message naming the variable, instead of failing later on the first request that needs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Self

from pydantic import BaseModel, ConfigDict, ValidationError


class SettingsError(RuntimeError):
    """The function's environment is incomplete or invalid: a deployment error, not a user error."""


class EnvSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Self:
        env = os.environ if environ is None else environ
        values = {name: env[name.upper()] for name in cls.model_fields if name.upper() in env}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{str(error['loc'][0]).upper()}: {error['msg']}" for error in exc.errors(include_url=False)
            )
            raise SettingsError(f"invalid environment for {cls.__name__}: {problems}") from exc
