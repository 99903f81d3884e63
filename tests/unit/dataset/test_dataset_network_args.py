"""kohya's `network_args` (`["conv_dim=8", "conv_alpha=4"]`): LoCon's conv rank and alpha are honoured,
kohya's default conv_alpha applies, other arguments are reported as ignored, bad ones named."""

import pytest
from loraflow_shared.dataset.config import ParsedConfig, parse_config
from loraflow_shared.errors import ValidationFailed


def parse(text: str) -> ParsedConfig:
    return parse_config(text.encode(), "config.toml")


def test_given_conv_dim_and_alpha_when_parsed_then_honoured_and_recorded_as_kohya_does() -> None:
    parsed = parse('[network_arguments]\nnetwork_args = ["conv_dim=8", " conv_alpha = 4 "]\n')

    args = parsed.config.network_args
    assert (args.conv_dim, args.conv_scale_alpha) == (8, 4.0)
    assert parsed.ignored_keys == []


def test_given_conv_dim_alone_when_parsed_then_kohyas_conv_alpha_of_1() -> None:
    args = parse('network_args = ["conv_dim=4"]').config.network_args

    assert (args.conv_dim, args.conv_alpha, args.conv_scale_alpha) == (4, None, 1.0)


def test_given_no_network_args_when_parsed_then_no_convolutions_and_nothing_recorded() -> None:
    args = parse("network_dim = 4").config.network_args

    assert (args.conv_dim, args.ignored) == (None, [])


def test_given_arguments_loraflow_does_not_use_when_parsed_then_each_reported_as_ignored() -> None:
    parsed = parse('network_args = ["conv_dim=4", "algo=lokr", "dropout=0.1"]')

    assert parsed.ignored_keys == ["network_args algo", "network_args dropout"]
    args = parsed.config.network_args
    assert (args.conv_dim, args.conv_scale_alpha) == (4, 1.0)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["conv_dim=eight"]', "network_args.conv_dim: input should be a valid integer"),
        ('["conv_dim=0"]', "network_args.conv_dim: must be between 1 and 1024"),
        ('["conv_dim=4", "conv_alpha=-1"]', "network_args.conv_alpha: must be greater than 0"),
        ('["conv_alpha=4"]', "network_args: conv_alpha is set without conv_dim"),
        ('["conv_dim=4", "conv_dim=8"]', "network_args: conv_dim given more than once"),
        ('"conv_dim=4"', 'network_args: expected a list of "name=value" strings'),
        ('["conv_dim"]', 'network_args: expected a list of "name=value" strings'),
    ],
)
def test_given_bad_network_args_when_parsed_then_invalid_config_naming_them(value: str, message: str) -> None:
    with pytest.raises(ValidationFailed) as rejected:
        parse(f"network_args = {value}")

    [problem] = rejected.value.problems
    assert problem.message.startswith(message), problem.message
