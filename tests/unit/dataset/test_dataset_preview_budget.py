"""The preview budget: a job's previews must render within one async-endpoint invocation."""

import math

from dataset_memory import MemoryBucket
from imagegen import image_bytes
from loraflow_ingest.logic import preview_settings
from loraflow_shared.dataset.config import TrainingConfig
from loraflow_shared.dataset.layout import MAX_PREVIEW_PROMPTS, Subset
from loraflow_shared.dataset.preview_budget import (
    MAX_RENDER_SECONDS,
    MODEL_LOAD_ALLOWANCE_S,
    PREVIEW_INVOCATION_TIMEOUT_S,
    RENDERS_PER_PROMPT,
    SECONDS_PER_MEGAPIXEL_STEP,
    estimated_render_seconds,
    job_preview_prompts,
)
from loraflow_shared.dataset.validate import ValidationReport, validate_dataset
from loraflow_shared.errors import ErrorCode

DATASET = "budget"
AWS_MAX_INVOCATION_TIMEOUT_S = 3600  # InvokeEndpointAsync's InvocationTimeoutSeconds range is 1..3600


def validate(config: str, folders: tuple[str, ...] = ("60_dwjz",)) -> ValidationReport:
    files = {f"{DATASET}/config.toml": config.encode()}
    for index, folder in enumerate(folders):
        files[f"{DATASET}/{folder}/a.png"] = image_bytes("PNG", 96, 96, seed=index)
    bucket = MemoryBucket(files)
    return validate_dataset(DATASET, bucket.listing(), bucket)


def previews(steps: int, resolution: int, prompts: int | None = MAX_PREVIEW_PROMPTS) -> str:
    lines = ["[loraflow]", f"preview_steps = {steps}", f"preview_resolution = {resolution}"]
    if prompts is not None:
        lines.append("preview_prompts = [" + ", ".join(f'"dwjz {i}"' for i in range(prompts)) + "]")
    return "\n".join(lines) + "\n"


def most_steps(prompts: int, side: int) -> int:
    """The most steps the budget allows for `prompts` square previews of `side` px."""
    per_step = prompts * RENDERS_PER_PROMPT * side * side / 1e6 * SECONDS_PER_MEGAPIXEL_STEP
    return math.floor(MAX_RENDER_SECONDS / per_step)


def test_given_constants_when_read_then_limit_is_the_invocation_less_the_model_load_within_aws_max() -> None:
    assert PREVIEW_INVOCATION_TIMEOUT_S <= AWS_MAX_INVOCATION_TIMEOUT_S
    assert MAX_RENDER_SECONDS == PREVIEW_INVOCATION_TIMEOUT_S - MODEL_LOAD_ALLOWANCE_S == 1200
    assert RENDERS_PER_PROMPT == 2  # the base model alone and with the LoRA, same seed
    assert estimated_render_seconds(1, 1, 1000, 1000) == 2 * SECONDS_PER_MEGAPIXEL_STEP == 2.0
    assert estimated_render_seconds(8, 20, 512, 512) == 8 * 2 * 20 * 0.262144


def test_given_default_previews_when_estimated_then_far_inside_the_budget() -> None:
    config = TrainingConfig()  # 20 steps at the training resolution (512), at most 8 prompts

    estimate = estimated_render_seconds(MAX_PREVIEW_PROMPTS, config.loraflow.preview_steps, 512, 512)

    assert estimate < MAX_RENDER_SECONDS / 10
    assert validate("").accepted


def test_given_largest_combination_within_budget_when_validated_then_accepted() -> None:
    steps = most_steps(MAX_PREVIEW_PROMPTS, 1024)
    assert steps == 71  # 8 prompts x 2 renders x 71 steps x 1.05 MP = 1191 s: a real edge

    report = validate(previews(steps, 1024))

    assert report.accepted, report.errors


def test_given_one_step_above_budget_when_validated_then_one_invalid_config_with_estimate_limit_and_fix() -> (
    None
):
    steps = most_steps(MAX_PREVIEW_PROMPTS, 1024) + 1

    report = validate(previews(steps, 1024))

    assert [(p.code, p.path) for p in report.errors] == [(ErrorCode.INVALID_CONFIG, "config.toml")]
    assert report.errors[0].message == (
        f"[loraflow] previews: 8 preview prompts x 2 pictures (base model, LoRA) x {steps} steps at "
        "1024x1024 are estimated at 1208 s of rendering, the limit is 1200 s (one 1800 s endpoint "
        "invocation less 600 s to load the model): "
        "reduce preview_steps, preview_resolution or the number of preview_prompts"
    )


def test_given_largest_side_when_validated_then_budget_bounds_prompts_times_steps() -> None:
    steps = most_steps(1, 2048)  # 4.19 MP per step, 2 pictures: 143 steps for one prompt

    assert validate(previews(min(steps, 150), 2048, prompts=1)).accepted
    assert validate(previews(steps // 2, 2048, prompts=2)).accepted
    assert not validate(previews(steps // 2 + 1, 2048, prompts=2)).accepted


def test_given_no_preview_prompts_when_validated_then_the_default_prompts_of_the_subsets_count() -> None:
    config = previews(75, 1024, prompts=None)  # 2 pictures x 75 steps x 1.05 MP: 157 s per prompt

    one_subset = validate(config, ("60_dwjz",))  # 4 default prompts: 629 s
    two_subsets = validate(config, ("60_dwjz", "20_zqxj dog"))  # 8 default prompts: 1258 s

    assert one_subset.accepted, one_subset.errors
    assert [p.code for p in two_subsets.errors] == [ErrorCode.INVALID_CONFIG]
    assert (
        "8 default preview prompts (from the subsets) x 2 pictures (base model, LoRA) x 75 steps"
        in two_subsets.errors[0].message
    )


def test_given_reg_subsets_when_validated_then_they_add_no_default_prompts() -> None:
    config = previews(75, 1024, prompts=None)

    report = validate(config, ("60_dwjz", "reg/1_person", "reg/1_man"))

    assert report.accepted, report.errors


def test_given_no_preview_resolution_when_validated_then_estimated_at_the_shorter_training_side() -> None:
    base = 'resolution = "1536,1024"\n[loraflow]\n'
    prompts = 'preview_prompts = ["a", "b", "c", "d", "e", "f", "g", "h"]\n'

    assert validate(base + prompts + "preview_steps = 71\n").accepted
    assert not validate(base + prompts + "preview_steps = 72\n").accepted


def test_given_accepted_report_when_ingest_fixes_previews_then_same_prompts_and_side_as_the_budget() -> None:
    report = validate('resolution = "768,512"\n', ("60_dwjz", "20_zqxj dog", "reg/1_dog"))
    assert report.config is not None
    subsets = [
        Subset(folder=s.folder, repeats=s.repeats, trigger=s.trigger, class_name=s.class_name)
        for s in report.subsets
    ]

    settings = preview_settings(report)

    assert settings.prompts == job_preview_prompts(report.config, subsets)
    assert len(settings.prompts) == MAX_PREVIEW_PROMPTS
    assert settings.resolution == report.config.preview_side == 512
