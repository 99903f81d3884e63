import pytest
from loraflow_shared.dataset.config import ParsedConfig, ignored_key_warnings, parse_config
from loraflow_shared.errors import ErrorCode, ValidationFailed

CONFIG_PATH = "kohya-sdxl-config.toml"

SECTIONED_KOHYA = b"""
[model_arguments]
pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"

[training_arguments]
resolution = "1024,768"
max_train_steps = 400
train_batch_size = 2
seed = 7
mixed_precision = "bf16"
xformers = true
cache_latents = true

[network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16.0

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 5e-5

[saving_arguments]
output_name = "dwjz-v1"

[[datasets]]
resolution = 512

[loraflow]
preview_prompts = ["a photo of dwjz", "dwjz at the beach"]
preview_steps = 12
preview_resolution = 256
preview_seed = 3
"""


def parse(text: str) -> ParsedConfig:
    return parse_config(text.encode(), CONFIG_PATH)


def rejection(text: str | bytes) -> list[str]:
    raw = text.encode() if isinstance(text, str) else text
    with pytest.raises(ValidationFailed) as caught:
        parse_config(raw, CONFIG_PATH)
    assert all(problem.code is ErrorCode.INVALID_CONFIG for problem in caught.value.problems)
    assert all(problem.path == CONFIG_PATH for problem in caught.value.problems)
    return [problem.message for problem in caught.value.problems]


def test_given_sectioned_kohya_config_when_parsed_then_tables_are_flattened() -> None:
    parsed = parse_config(SECTIONED_KOHYA, CONFIG_PATH)

    config = parsed.config
    assert config.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.resolution == (1024, 768)
    assert (config.width, config.height) == (1024, 768)
    assert (config.network_dim, config.network_alpha, config.learning_rate) == (32, 16.0, 5e-5)
    assert (config.max_train_steps, config.train_batch_size, config.seed) == (400, 2, 7)
    assert config.mixed_precision == "bf16"
    assert config.output_name == "dwjz-v1"


def test_given_sectioned_kohya_config_when_parsed_then_loraflow_table_is_read() -> None:
    settings = parse_config(SECTIONED_KOHYA, CONFIG_PATH).config.loraflow

    assert settings.preview_prompts == ["a photo of dwjz", "dwjz at the beach"]
    assert (settings.preview_steps, settings.preview_resolution, settings.preview_seed) == (12, 256, 3)


def test_given_unknown_kohya_keys_when_parsed_then_listed_as_ignored_sorted() -> None:
    parsed = parse_config(SECTIONED_KOHYA, CONFIG_PATH)

    assert parsed.ignored_keys == ["datasets", "network_module", "xformers"]


def test_given_ignored_keys_when_warnings_built_then_one_warning_per_key() -> None:
    parsed = parse("xformers = true\nsave_model_as = 'safetensors'\n")

    warnings = ignored_key_warnings(parsed, CONFIG_PATH)

    assert [(w.code, w.path) for w in warnings] == [(ErrorCode.IGNORED_CONFIG_KEY, CONFIG_PATH)] * 2
    assert [w.message.split(":")[0] for w in warnings] == ["save_model_as", "xformers"]


def test_given_flat_config_when_parsed_then_same_keys_are_honoured() -> None:
    parsed = parse('network_dim = 8\nresolution = 768\nlearning_rate = "2e-4"\n')

    assert parsed.config.network_dim == 8
    assert parsed.config.resolution == (768, 768)
    assert parsed.config.learning_rate == 2e-4
    assert parsed.ignored_keys == []


def test_given_empty_config_when_parsed_then_defaults() -> None:
    config = parse("").config

    assert config.resolution == (512, 512)
    assert (config.network_dim, config.max_train_steps, config.output_name) == (16, 1600, "lora")
    assert config.loraflow.preview_prompts is None
    assert config.preview_size == (512, 512)


@pytest.mark.parametrize(
    ("value", "expected"), [("512", (512, 512)), ("768,512", (768, 512)), ("64, 4096", (64, 4096))]
)
def test_given_kohya_resolution_string_when_parsed_then_width_height(
    value: str, expected: tuple[int, int]
) -> None:
    assert parse(f'resolution = "{value}"').config.resolution == expected


def test_given_preview_resolution_when_preview_size_then_square_override() -> None:
    config = parse('resolution = "768,512"\n[loraflow]\npreview_resolution = 256\n').config

    assert config.preview_size == (256, 256)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("network_dim = 0", "network_dim: must be between 1 and 1024, got 0"),
        ("network_dim = 2048", "network_dim: must be between 1 and 1024, got 2048"),
        ("network_alpha = 0", "network_alpha: must be greater than 0 and at most 1024, got 0"),
        ("learning_rate = 1.5", "learning_rate: must be greater than 0 and at most 1, got 1.5"),
        ("learning_rate = -1e-4", "learning_rate: must be greater than 0 and at most 1, got -0.0001"),
        ("max_train_steps = 0", "max_train_steps: must be between 1 and 100000, got 0"),
        ("train_batch_size = 65", "train_batch_size: must be between 1 and 64, got 65"),
        ("seed = -1", "seed: must be between 0 and 4294967295, got -1"),
        (
            'resolution = "32,512"',
            "resolution (width): must be between 64 and 4096 and a multiple of 8, got 32",
        ),
        (
            'resolution = "512,500"',
            "resolution (height): must be between 64 and 4096 and a multiple of 8, got 500",
        ),
        ("[loraflow]\npreview_steps = 0", "loraflow.preview_steps: must be between 1 and 150, got 0"),
        ("[loraflow]\npreview_steps = 151", "loraflow.preview_steps: must be between 1 and 150, got 151"),
        (
            "[loraflow]\npreview_resolution = 100",
            "loraflow.preview_resolution: must be between 64 and 2048 and a multiple of 8, got 100",
        ),
        ("[loraflow]\npreview_seed = -3", "loraflow.preview_seed: must be between 0 and 4294967295, got -3"),
    ],
)
def test_given_out_of_range_value_when_parsed_then_message_names_key_rule_and_value(
    line: str, message: str
) -> None:
    assert rejection(line) == [message]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('mixed_precision = "fp32"', "mixed_precision: input should be 'no', 'fp16' or 'bf16', got 'fp32'"),
        ('output_name = ".hidden"', "output_name: must be a file name"),
        ('output_name = "a/b"', "output_name: must be a file name"),
        ('resolution = "wide"', 'resolution: expected an integer like 512, or a string like "512"'),
        ("resolution = true", "resolution: expected an integer"),
        ('network_dim = "many"', "network_dim: input should be a valid integer"),
        ("max_train_steps = 1.5", "max_train_steps: input should be a valid integer"),
        (
            'pretrained_model_name_or_path = ""',
            "pretrained_model_name_or_path: string should have at least 1",
        ),
        ("[loraflow]\npreview_prompts = []", "loraflow.preview_prompts: list should have at least 1 item"),
        (
            "[loraflow]\npreview_prompts = ['a','b','c','d','e','f','g','h','i']",
            "loraflow.preview_prompts: list",
        ),
        (
            '[loraflow]\npreview_prompts = ["ok", "  "]',
            "loraflow.preview_prompts[1]: string should have at least",
        ),
        (
            "[loraflow]\npreview_step = 3",
            "loraflow.preview_step: unknown [loraflow] setting (known: preview_prompts",
        ),
        ("loraflow = 5", "loraflow: input should be a valid dictionary"),
    ],
)
def test_given_wrong_type_or_value_when_parsed_then_message_names_key(line: str, fragment: str) -> None:
    messages = rejection(line)

    assert len(messages) == 1
    assert messages[0].startswith(fragment)


def test_given_several_bad_keys_when_parsed_then_every_one_is_reported() -> None:
    messages = rejection("network_dim = 0\nseed = -1\n[loraflow]\npreview_steps = 0\n")

    assert [message.split(":")[0] for message in messages] == [
        "network_dim",
        "seed",
        "loraflow.preview_steps",
    ]


def test_given_key_set_differently_in_two_tables_when_parsed_then_conflict_reported() -> None:
    messages = rejection("[training_arguments]\nseed = 1\n[misc]\nseed = 2\n")

    assert messages == ["seed: set twice with different values ([training_arguments]: 1, [misc]: 2)"]


def test_given_key_set_identically_in_two_tables_when_parsed_then_accepted() -> None:
    assert parse("[a]\nseed = 5\n[b]\nseed = 5\n").config.seed == 5


def test_given_broken_toml_when_parsed_then_invalid_config_with_position() -> None:
    messages = rejection("network_dim = 8\nresolution = = 512\nseed = 1\n")

    assert len(messages) == 1
    assert messages[0].startswith("config is not valid TOML:")
    assert "line 2" in messages[0]


def test_given_non_utf8_config_when_parsed_then_invalid_config() -> None:
    assert rejection(b"output_name = '\xff\xfe'\n")[0].startswith("config is not UTF-8 text")


def test_given_utf8_bom_when_parsed_then_accepted() -> None:
    assert parse_config(b"\xef\xbb\xbfnetwork_dim = 4\n", CONFIG_PATH).config.network_dim == 4


def test_given_parsed_config_when_dumped_to_json_and_back_then_equal() -> None:
    config = parse_config(SECTIONED_KOHYA, CONFIG_PATH).config

    assert type(config).model_validate(config.model_dump(mode="json")) == config
