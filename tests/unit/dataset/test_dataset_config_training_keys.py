"""The training keys of issue 3: bounds, kohya spellings, cross-key rules and derived values."""

import pytest
from loraflow_shared.dataset.config import TrainingConfig, config_warnings, parse_config
from loraflow_shared.errors import ErrorCode, ValidationFailed

CONFIG_PATH = "config.toml"

KOHYA_TRAINING_KEYS = b"""
[model_arguments]
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
sdxl = false
clip_skip = 2

[network_arguments]
network_train_unet_only = true

[training_arguments]
max_train_epochs = 10
train_batch_size = 4
gradient_accumulation_steps = 2
gradient_checkpointing = true
cache_latents = false
save_every_n_steps = 50
noise_offset = 0.05
min_snr_gamma = 5
prior_loss_weight = 0.5
max_grad_norm = 0
shuffle_caption = true
keep_tokens = 1
caption_separator = ";"
caption_dropout_rate = 0.1
flip_aug = true
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 960
bucket_reso_steps = 32
bucket_no_upscale = true
xformers = true
sdpa = true
mem_eff_attn = false

[optimizer_arguments]
optimizer_type = "adamw8bit"
unet_lr = 2e-4
text_encoder_lr = 5e-5
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0.1
lr_scheduler_num_cycles = 3
lr_scheduler_power = 2.0
"""


def parse(text: str) -> TrainingConfig:
    return parse_config(text.encode(), CONFIG_PATH).config


def rejection(text: str) -> list[str]:
    with pytest.raises(ValidationFailed) as caught:
        parse_config(text.encode(), CONFIG_PATH)
    assert {(p.code, p.path) for p in caught.value.problems} == {(ErrorCode.INVALID_CONFIG, CONFIG_PATH)}
    return [problem.message for problem in caught.value.problems]


def test_given_every_training_key_when_parsed_then_each_value_is_kept() -> None:
    parsed = parse_config(KOHYA_TRAINING_KEYS, CONFIG_PATH)

    config = parsed.config
    assert (config.sdxl, config.clip_skip, config.network_train_unet_only) == (False, 2, True)
    assert (config.max_train_epochs, config.train_batch_size, config.gradient_accumulation_steps) == (
        10,
        4,
        2,
    )
    assert (config.gradient_checkpointing, config.cache_latents, config.save_every_n_steps) == (
        True,
        False,
        50,
    )
    assert (config.noise_offset, config.min_snr_gamma, config.prior_loss_weight) == (0.05, 5.0, 0.5)
    assert config.max_grad_norm == 0.0
    assert (config.shuffle_caption, config.keep_tokens, config.caption_separator) == (True, 1, ";")
    assert (config.caption_dropout_rate, config.flip_aug) == (0.1, True)
    assert (config.enable_bucket, config.min_bucket_reso, config.max_bucket_reso) == (True, 320, 960)
    assert (config.bucket_reso_steps, config.bucket_no_upscale) == (32, True)
    assert (config.optimizer_type, config.unet_lr, config.text_encoder_lr) == ("AdamW8bit", 2e-4, 5e-5)
    assert (config.lr_scheduler, config.lr_warmup_steps) == ("cosine_with_restarts", 0.1)
    assert (config.lr_scheduler_num_cycles, config.lr_scheduler_power) == (3, 2.0)
    assert parsed.ignored_keys == ["mem_eff_attn", "sdpa", "xformers"]


def test_given_empty_config_when_parsed_then_unpinned_keys_are_none_for_the_memory_plan() -> None:
    config = parse("")

    unpinned = [
        *("train_batch_size", "sdxl", "max_train_epochs", "unet_lr", "text_encoder_lr"),
        *("network_train_unet_only", "optimizer_type", "gradient_checkpointing", "cache_latents"),
        *("noise_offset", "min_snr_gamma", "save_every_n_steps", "clip_skip"),
    ]
    assert {key: getattr(config, key) for key in unpinned} == dict.fromkeys(unpinned)
    assert (config.lr_scheduler, config.lr_warmup_steps, config.gradient_accumulation_steps) == (
        "constant",
        0,
        1,
    )
    assert (config.max_grad_norm, config.prior_loss_weight, config.caption_separator) == (1.0, 1.0, ",")
    assert (config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps) == (256, 1024, 64)
    assert not (config.enable_bucket or config.flip_aug or config.shuffle_caption or config.bucket_no_upscale)


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [("adamw", "AdamW"), ("ADAMW8BIT", "AdamW8bit"), ("AdamW8Bit", "AdamW8bit"), ("adafactor", "Adafactor")],
)
def test_given_optimizer_in_any_case_when_parsed_then_canonical_name(spelling: str, expected: str) -> None:
    assert parse(f'optimizer_type = "{spelling}"').optimizer_type == expected


def test_given_empty_optimizer_type_when_parsed_then_not_pinned_as_kohya_default() -> None:
    assert parse('optimizer_type = ""').optimizer_type is None


def test_given_scheduler_in_capitals_when_parsed_then_lower_case_name() -> None:
    assert parse('lr_scheduler = "Cosine"').lr_scheduler == "cosine"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("train_batch_size = 0", "train_batch_size: must be between 1 and 64, got 0"),
        ("max_train_epochs = 0", "max_train_epochs: must be between 1 and 10000, got 0"),
        ("max_train_epochs = 10001", "max_train_epochs: must be between 1 and 10000, got 10001"),
        ("unet_lr = 0", "unet_lr: must be greater than 0 and at most 1, got 0"),
        ("text_encoder_lr = 1.5", "text_encoder_lr: must be greater than 0 and at most 1, got 1.5"),
        ("lr_scheduler_num_cycles = 0", "lr_scheduler_num_cycles: must be between 1 and 1000, got 0"),
        ("lr_scheduler_power = 0", "lr_scheduler_power: must be greater than 0 and at most 10, got 0"),
        ("gradient_accumulation_steps = 0", "gradient_accumulation_steps: must be between 1 and 1024, got 0"),
        (
            "gradient_accumulation_steps = 1025",
            "gradient_accumulation_steps: must be between 1 and 1024, got 1025",
        ),
        ("noise_offset = -0.1", "noise_offset: must be between 0 and 1, got -0.1"),
        ("noise_offset = 1.5", "noise_offset: must be between 0 and 1, got 1.5"),
        ("min_snr_gamma = 0", "min_snr_gamma: must be greater than 0 and at most 20, got 0"),
        ("min_snr_gamma = 21", "min_snr_gamma: must be greater than 0 and at most 20, got 21"),
        ("save_every_n_steps = 0", "save_every_n_steps: must be between 1 and 100000, got 0"),
        ("max_grad_norm = -1", "max_grad_norm: must be between 0 and 1000, got -1"),
        ("clip_skip = 0", "clip_skip: must be between 1 and 12, got 0"),
        ("clip_skip = 13", "clip_skip: must be between 1 and 12, got 13"),
        ("keep_tokens = -1", "keep_tokens: must be between 0 and 75, got -1"),
        ("keep_tokens = 76", "keep_tokens: must be between 0 and 75, got 76"),
        ("caption_dropout_rate = 1.01", "caption_dropout_rate: must be between 0 and 1, got 1.01"),
        (
            "min_bucket_reso = 250",
            "min_bucket_reso: must be between 64 and 4096 and a multiple of 8, got 250",
        ),
        (
            "max_bucket_reso = 8192",
            "max_bucket_reso: must be between 64 and 4096 and a multiple of 8, got 8192",
        ),
        (
            "bucket_reso_steps = 60",
            "bucket_reso_steps: must be between 8 and 1024 and a multiple of 8, got 60",
        ),
        ("prior_loss_weight = -0.5", "prior_loss_weight: must be between 0 and 100, got -0.5"),
    ],
)
def test_given_out_of_range_training_key_when_parsed_then_message_names_key_rule_and_value(
    line: str, message: str
) -> None:
    assert rejection(line) == [message]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (
            'optimizer_type = "Lion"',
            "optimizer_type: must be one of 'AdamW', 'AdamW8bit' or 'Adafactor' (any case), got 'Lion'",
        ),
        ('lr_scheduler = "adafactor"', "lr_scheduler: input should be 'constant', 'constant_with_warmup'"),
        ('caption_separator = ""', "caption_separator: string should have at least 1 character"),
        ('sdxl = "maybe"', "sdxl: input should be a valid boolean"),
        ('enable_bucket = "often"', "enable_bucket: input should be a valid boolean"),
        ('lr_scheduler = "cosine"\nlr_warmup_steps = 1.5', "lr_warmup_steps: a float is a fraction"),
        ('lr_scheduler = "cosine"\nlr_warmup_steps = -1', "lr_warmup_steps: a step count must be between"),
        ("lr_warmup_steps = true", "lr_warmup_steps: expected a step count (integer) or a fraction"),
        ('lr_warmup_steps = "soon"', "lr_warmup_steps: expected a step count (integer) or a fraction"),
    ],
)
def test_given_wrong_type_or_value_when_parsed_then_one_message_names_key(line: str, fragment: str) -> None:
    messages = rejection(line)

    assert len(messages) == 1
    assert messages[0].startswith(fragment)


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0), ("25", 25), ("0.25", 0.25), ('"30"', 30), ('"0.5"', 0.5)]
)
def test_given_warmup_as_steps_or_fraction_when_parsed_then_kept_with_its_kind(
    value: str, expected: int | float
) -> None:
    warmup = parse(f'lr_scheduler = "linear"\nlr_warmup_steps = {value}').lr_warmup_steps

    assert warmup == expected
    assert type(warmup) is type(expected)


@pytest.mark.parametrize(
    ("lines", "messages"),
    [
        (
            "min_bucket_reso = 1024\nmax_bucket_reso = 512",
            ["min_bucket_reso: must be at most max_bucket_reso (512), got 1024"],
        ),
        (
            "enable_bucket = true\nmin_bucket_reso = 320\nmax_bucket_reso = 1000",
            [
                "max_bucket_reso: must be a multiple of bucket_reso_steps (64) "
                "when enable_bucket = true, got 1000"
            ],
        ),
        (
            "enable_bucket = true\nresolution = 1024\nmin_bucket_reso = 256\nmax_bucket_reso = 768",
            [
                "resolution: its longer side must be at most max_bucket_reso (768) "
                "when enable_bucket = true, got 1024x1024"
            ],
        ),
        (
            'enable_bucket = true\nresolution = "1024,128"',
            [
                "resolution: its shorter side must be at least min_bucket_reso (256) "
                "when enable_bucket = true, got 1024x128"
            ],
        ),
        (
            "lr_warmup_steps = 100",
            [
                'lr_warmup_steps: the "constant" lr_scheduler has no warmup; use lr_scheduler = '
                '"constant_with_warmup" or set lr_warmup_steps = 0, got 100'
            ],
        ),
        (
            'lr_scheduler = "linear"\nmax_train_steps = 50\nlr_warmup_steps = 51',
            ["lr_warmup_steps: must be at most max_train_steps (50), got 51"],
        ),
    ],
)
def test_given_contradicting_keys_when_parsed_then_invalid_config_names_the_keys(
    lines: str, messages: list[str]
) -> None:
    assert rejection(lines) == messages


def test_given_several_bucket_contradictions_when_parsed_then_each_reported() -> None:
    messages = rejection(
        "enable_bucket = true\nresolution = 2048\nmin_bucket_reso = 200\nmax_bucket_reso = 1000"
    )

    assert [message.split(":")[0] for message in messages] == [
        "min_bucket_reso",
        "max_bucket_reso",
        "resolution",
    ]


@pytest.mark.parametrize(
    "lines",
    [
        "resolution = 2048",  # bucket range only binds when bucketing is on
        "bucket_reso_steps = 24\nmin_bucket_reso = 256",
        'lr_scheduler = "cosine"\nmax_train_epochs = 2\nmax_train_steps = 10\nlr_warmup_steps = 500',
        'lr_scheduler = "constant_with_warmup"\nlr_warmup_steps = 0.05',
        "enable_bucket = true\nresolution = 1024\nmin_bucket_reso = 1024\nmax_bucket_reso = 1024",
    ],
)
def test_given_consistent_keys_when_parsed_then_accepted(lines: str) -> None:
    assert isinstance(parse(lines), TrainingConfig)


def test_given_clip_skip_on_sdxl_when_warnings_built_then_setting_adjusted() -> None:
    parsed = parse_config(b"sdxl = true\nclip_skip = 2\nxformers = true\n", CONFIG_PATH)

    warnings = config_warnings(parsed, CONFIG_PATH)

    assert [(w.code, w.message.split(":")[0]) for w in warnings] == [
        (ErrorCode.IGNORED_CONFIG_KEY, "xformers"),
        (ErrorCode.SETTING_ADJUSTED, "clip_skip"),
    ]
    assert all(w.is_warning and w.path == CONFIG_PATH for w in warnings)


def test_given_text_encoder_lr_with_unet_only_when_warnings_built_then_setting_adjusted() -> None:
    parsed = parse_config(b"network_train_unet_only = true\ntext_encoder_lr = 1e-5\n", CONFIG_PATH)

    assert [(w.code, w.message.split(":")[0]) for w in config_warnings(parsed, CONFIG_PATH)] == [
        (ErrorCode.SETTING_ADJUSTED, "text_encoder_lr")
    ]


def test_given_clip_skip_with_undetected_family_when_warnings_built_then_none() -> None:
    assert config_warnings(parse_config(b"clip_skip = 2\n", CONFIG_PATH), CONFIG_PATH) == []


def test_given_no_component_lrs_when_resolved_then_learning_rate_is_used() -> None:
    config = parse("learning_rate = 3e-4")

    assert (config.unet_learning_rate, config.text_encoder_learning_rate) == (3e-4, 3e-4)


def test_given_component_lrs_when_resolved_then_each_wins_over_learning_rate() -> None:
    config = parse("learning_rate = 3e-4\nunet_lr = 1e-4\ntext_encoder_lr = 2e-5")

    assert (config.unet_learning_rate, config.text_encoder_learning_rate) == (1e-4, 2e-5)


@pytest.mark.parametrize(
    ("lines", "batches_per_epoch", "expected"),
    [
        ("max_train_steps = 30", 7, 30),
        ("max_train_steps = 30\nmax_train_epochs = 3", 7, 21),
        ("max_train_epochs = 3\ngradient_accumulation_steps = 2", 7, 12),  # ceil(7 / 2) = 4 per epoch
        ("max_train_epochs = 2\ngradient_accumulation_steps = 4", 8, 4),
        ("max_train_epochs = 5", 0, 5),  # an empty epoch still counts one step, never zero
    ],
)
def test_given_steps_or_epochs_when_total_steps_then_epochs_win_as_kohya(
    lines: str, batches_per_epoch: int, expected: int
) -> None:
    assert parse(lines).total_steps(batches_per_epoch) == expected


@pytest.mark.parametrize(
    ("warmup", "total", "expected"), [("0.1", 250, 25), ("0.5", 3, 1), ("40", 250, 40), ("40", 30, 30)]
)
def test_given_warmup_when_in_steps_then_fraction_of_total_or_capped_count(
    warmup: str, total: int, expected: int
) -> None:
    config = parse(f'lr_scheduler = "cosine"\nmax_train_epochs = 1\nlr_warmup_steps = {warmup}')

    assert config.warmup_steps(total) == expected


@pytest.mark.parametrize(
    "name", ["pytorch_lora_weights", "PyTorch_LoRA_Weights", "pytorch_lora_weights.safetensors"]
)
def test_given_output_name_of_the_diffusers_file_when_parsed_then_rejected(name: str) -> None:
    assert rejection(f'output_name = "{name}"') == [
        f"output_name: '{name}' is reserved for the diffusers-format file"
        " loraflow also writes; choose another name"
    ]


def test_given_other_output_name_when_parsed_then_kept() -> None:
    assert parse('output_name = "pytorch_lora_weights_v2"').output_name == "pytorch_lora_weights_v2"
