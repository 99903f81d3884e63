"""The optional Hugging Face token for gated base models, read from Secrets Manager at start.

The stack passes only the secret's ARN (`HF_TOKEN_SECRET_ARN`, empty when none is configured); the
token itself goes into this process's `HF_TOKEN`, which `huggingface_hub` reads. It is never logged,
written to a file, put in a failure reason or stored on the job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from loraflow_shared.errors import ErrorCode, LoraflowError

SECRET_ARN_VARIABLE = "HF_TOKEN_SECRET_ARN"
TOKEN_VARIABLE = "HF_TOKEN"  # huggingface_hub's own variable
# A JSON secret (the console's key/value form) may name the token under one of these keys.
_JSON_KEYS = ("HF_TOKEN", "token", "hf_token")


def _token_from_secret(secret: str) -> str:
    text = secret.strip()
    if text.startswith("{"):
        try:
            values: Any = json.loads(text)
        except ValueError:
            values = None
        token = next((values[key] for key in _JSON_KEYS if isinstance(values, dict) and key in values), None)
        if not isinstance(token, str) or not token.strip():
            raise LoraflowError(
                ErrorCode.MODEL_LOAD_FAILED,
                f"the Hugging Face token secret is JSON without a non-empty {' / '.join(_JSON_KEYS)} key",
            )
        return token.strip()
    return text


@contextmanager
def _sdk_debug_logging_off() -> Iterator[None]:
    """botocore logs response bodies at DEBUG: the secret must not reach a log even when debugging."""
    sdk = logging.getLogger("botocore")
    previous = sdk.level
    sdk.setLevel(max(previous, logging.INFO))
    try:
        yield
    finally:
        sdk.setLevel(previous)


def load_hub_token(
    environ: MutableMapping[str, str] | None = None,
    client_factory: Callable[[], Any] = lambda: boto3.client("secretsmanager"),
) -> bool:
    """Put the token named by `HF_TOKEN_SECRET_ARN` into `HF_TOKEN`; False when no secret is configured."""
    env = os.environ if environ is None else environ
    arn = env.get(SECRET_ARN_VARIABLE, "").strip()
    if not arn:
        return False
    env[TOKEN_VARIABLE] = read_hub_token(arn, client_factory)
    return True


def read_hub_token(arn: str, client_factory: Callable[[], Any]) -> str:
    """The token in the secret `arn`; an error (MODEL_LOAD_FAILED) names the secret, never the value."""
    try:
        with _sdk_debug_logging_off():
            secret = client_factory().get_secret_value(SecretId=arn)
    except (ClientError, BotoCoreError) as exc:
        code = (
            exc.response.get("Error", {}).get("Code", "")
            if isinstance(exc, ClientError)
            else type(exc).__name__
        )
        raise LoraflowError(
            ErrorCode.MODEL_LOAD_FAILED, f"cannot read the Hugging Face token secret {arn}: {code}"
        ) from None  # the exception chain is not kept: nothing of the call reaches the logs
    token = _token_from_secret(str(secret.get("SecretString") or ""))
    if not token:
        raise LoraflowError(ErrorCode.MODEL_LOAD_FAILED, f"the Hugging Face token secret {arn} is empty")
    return token
