"""Config keys for the model families: naming the family, and the flow-matching families' kohya keys."""

from __future__ import annotations

import pytest
from loraflow_shared.dataset.config import parse_config
from loraflow_shared.errors import ErrorCode, ValidationFailed


def _messages(text: str) -> list[str]:
    with pytest.raises(ValidationFailed) as raised:
        parse_config(text.encode(), "c.toml")
    assert {p.code for p in raised.value.problems} == {ErrorCode.INVALID_CONFIG}
    return [p.message for p in raised.value.problems]


def test_given_flux_keys_when_parsed_then_read_as_kohya_names_them() -> None:
    config = parse_config(
        b'model_family = "flux1"\nguidance_scale = 1.0\ntimestep_sampling = "shift"\n'
        b'discrete_flow_shift = 3.1582\nsigmoid_scale = 1.0\nmodel_prediction_type = "raw"\n'
        b"t5xxl_max_token_length = 256\n",
        "c.toml",
    ).config

    assert (config.model_family, config.timestep_sampling, config.t5xxl_max_token_length) == (
        "flux1",
        "shift",
        256,
    )
    assert (config.guidance_scale, config.discrete_flow_shift) == (1.0, 3.1582)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('model_family = "sd3"', "model_family"),
        ('timestep_sampling = "logit_normal"', "timestep_sampling"),
        ('model_prediction_type = "sigma_scaled"', "model_prediction_type"),
        ("t5xxl_max_token_length = 513", "t5xxl_max_token_length"),
        ("discrete_flow_shift = 0", "discrete_flow_shift"),
        ("guidance_scale = inf", "guidance_scale"),
    ],
)
def test_given_flow_key_out_of_range_when_parsed_then_invalid_config_naming_it(
    line: str, fragment: str
) -> None:
    [message] = _messages(line + "\n")
    assert message.startswith(fragment)


@pytest.mark.parametrize(
    "lines",
    ['model_family = "flux1"\nsdxl = true', 'model_family = "sdxl"\nsdxl = false'],
)
def test_given_model_family_and_sdxl_disagreeing_when_parsed_then_one_invalid_config(lines: str) -> None:
    [message] = _messages(lines + "\n")
    assert "contradicts sdxl" in message


@pytest.mark.parametrize(
    "lines", ['model_family = "sdxl"\nsdxl = true', 'model_family = "flux1"\nsdxl = false']
)
def test_given_model_family_and_sdxl_agreeing_when_parsed_then_accepted(lines: str) -> None:
    assert parse_config((lines + "\n").encode(), "c.toml").config.model_family is not None
