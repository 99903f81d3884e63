"""The Hugging Face token for gated base models: read from Secrets Manager (moto), put in HF_TOKEN, and
never shown — not in errors, not in logs."""

from __future__ import annotations

import json
import logging

import boto3
import pytest
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.hub_token import SECRET_ARN_VARIABLE, TOKEN_VARIABLE, load_hub_token

TOKEN = "hf_SeCrEtToKeN0123456789"


def _secret(value: str) -> str:
    return boto3.client("secretsmanager").create_secret(Name="hf", SecretString=value)["ARN"]


@pytest.mark.parametrize(
    "stored", [TOKEN, f"  {TOKEN}\n", json.dumps({"HF_TOKEN": TOKEN}), json.dumps({"token": TOKEN})]
)
def test_given_secret_when_loaded_then_token_in_hf_token(aws: None, stored: str) -> None:
    environ = {SECRET_ARN_VARIABLE: _secret(stored)}

    assert load_hub_token(environ) is True

    assert environ[TOKEN_VARIABLE] == TOKEN


@pytest.mark.parametrize("arn", ["", "   "])
def test_given_no_secret_configured_when_loaded_then_nothing_set(arn: str) -> None:
    environ = {SECRET_ARN_VARIABLE: arn}
    assert load_hub_token(environ, client_factory=lambda: pytest.fail("no call without a secret")) is False
    assert TOKEN_VARIABLE not in environ


@pytest.mark.parametrize("stored", [json.dumps({"password": TOKEN}), json.dumps({"HF_TOKEN": ""}), " "])
def test_given_secret_without_a_token_when_loaded_then_model_load_failed_without_the_value(
    aws: None, stored: str
) -> None:
    with pytest.raises(LoraflowError) as raised:
        load_hub_token({SECRET_ARN_VARIABLE: _secret(stored)})

    assert raised.value.code is ErrorCode.MODEL_LOAD_FAILED
    assert TOKEN not in str(raised.value)


def test_given_unreadable_secret_when_loaded_then_model_load_failed_naming_arn_not_value(
    aws: None, caplog: pytest.LogCaptureFixture
) -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:missing-AbCdEf"
    caplog.set_level(logging.DEBUG)

    with pytest.raises(LoraflowError) as raised:
        load_hub_token({SECRET_ARN_VARIABLE: arn})

    assert raised.value.code is ErrorCode.MODEL_LOAD_FAILED
    assert arn in raised.value.message and "ResourceNotFoundException" in raised.value.message
    assert raised.value.__cause__ is None  # nothing of the SDK call travels with it into a trace


def test_given_token_loaded_when_logs_read_then_the_value_appears_nowhere(
    aws: None, caplog: pytest.LogCaptureFixture
) -> None:
    arn = _secret(TOKEN)  # the test's own call may log it; the loader's must not
    caplog.set_level(logging.DEBUG)
    caplog.clear()

    load_hub_token({SECRET_ARN_VARIABLE: arn})

    assert TOKEN not in caplog.text
