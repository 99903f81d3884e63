"""Generations' domain rules: their InferenceId, the job's defaults and the render budget, the pending cap,
the bounded record on the job, outcomes (duplicates change nothing), and the guarded writes."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from loraflow_shared.base_models import BaseModelSource
from loraflow_shared.contracts import PreviewRequest
from loraflow_shared.dataset.layout import MAX_PREVIEW_PROMPTS
from loraflow_shared.errors import ErrorCode, LoraflowError, Problem
from loraflow_shared.jobs.errors import JobStateConflict, TooManyGenerations
from loraflow_shared.jobs.generations import (
    MAX_PENDING_GENERATIONS,
    MAX_STORED_GENERATIONS,
    MAX_STORED_GENERATIONS_BYTES,
    GenerationRequest,
    bounded,
    ended,
    generation_settings,
    pending_generation,
    render_request,
    with_new_generation,
    with_outcome,
)
from loraflow_shared.jobs.model import (
    MAX_INFERENCE_ID_CHARS,
    Artifacts,
    GeneratedImage,
    Generation,
    GenerationStatus,
    Job,
    JobStatus,
    PreviewSettings,
    generation_inference_id,
    inference_id,
    job_id_for,
    new_generation_id,
    parse_generation_inference_id,
    parse_inference_id,
)
from loraflow_shared.jobs.preview_timing import GENERATION_EXPIRY_S
from loraflow_shared.jobs.repository import JobRepository

JOB_ID = job_id_for("0001", "f" * 64)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
LORA = "s3://artifacts/jobs/x/lora/pytorch_lora_weights.safetensors"
# InvokeEndpointAsync's InferenceId pattern (SageMaker Runtime API reference): printable, no leading space.
INFERENCE_ID = re.compile(r"\A\S[\x20-\x7e]*\Z")


def completed_job(**fields: object) -> Job:
    values: dict[str, object] = {
        "job_id": JOB_ID,
        "dataset": "0001",
        "status": JobStatus.COMPLETED,
        "created_at": "2026-11-30T00:00:00.000Z",
        "updated_at": "2026-11-30T01:00:00.000Z",
        "fingerprint": "f" * 64,
        "dataset_s3_uri": "s3://datasets/0001/",
        "base_model": "owner/model",
        "preview": PreviewSettings(prompts=["p"], steps=20, resolution=512, seed=3, clip_skip=None),
        "artifacts": Artifacts(lora_diffusers_s3_uri=LORA, training_report_s3_uri="s3://artifacts/r.json"),
    }
    return Job.model_validate(values | fields)


def generation(at: datetime = NOW, prompts: list[str] | None = None, **request: object) -> Generation:
    parsed = GenerationRequest.model_validate({"prompts": prompts or ["zqxj dog"], **request})
    return pending_generation(new_generation_id(), parsed, generation_settings(completed_job(), parsed), at)


def test_given_generation_ids_when_made_then_a_valid_inference_id_parsed_back_by_its_own_parser_only() -> (
    None
):
    generation_id = new_generation_id()

    inference = generation_inference_id(JOB_ID, generation_id)

    assert parse_generation_inference_id(inference) == (JOB_ID, generation_id)
    assert len(inference) <= MAX_INFERENCE_ID_CHARS and INFERENCE_ID.match(inference)
    assert parse_inference_id(inference) is None  # never mistaken for an attempt's previews
    assert parse_generation_inference_id(inference_id(JOB_ID, 3)) is None
    for foreign in (
        "",
        JOB_ID,
        f"{JOB_ID}-g-",
        f"{JOB_ID}-g-{generation_id.upper()}",
        f"x-g-{generation_id}",
    ):
        assert parse_generation_inference_id(foreign) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"prompts": ["a"], "stpes": 4}, "stpes: unknown key (known: prompts, steps, seed, lora_scale"),
        ({"prompts": []}, "prompts: list should have at least 1 item"),
        ({"prompts": ["a"] * (MAX_PREVIEW_PROMPTS + 1)}, f"at most {MAX_PREVIEW_PROMPTS} items"),
        ({"prompts": ["  "]}, "prompts[0]: string should have at least 1 character"),
        ({"prompts": ["a"], "steps": 0}, "steps: must be between 1 and 150, got 0"),
        ({"prompts": ["a"], "steps": "4"}, "steps: input should be a valid integer"),
        (
            {"prompts": ["a"], "resolution": 100},
            "resolution: must be between 64 and 2048 and a multiple of 8",
        ),
        ({"prompts": ["a"], "seed": -1}, "seed: must be between 0 and 4294967295"),
        ({"prompts": ["a"], "lora_scale": 2.5}, "lora_scale: must be between -2 and 2"),
        ({"prompts": ["a"], "guidance": float("nan")}, "guidance: must be between 0 and 20"),
        (
            {"prompts": ["a"], "negative_prompt": "x" * 1001},
            "negative_prompt: string should have at most 1000",
        ),
        ({"steps": 4}, "prompts: field required"),
        ("[1, 2]", "the body must be a JSON object with keys prompts, steps, seed"),
        (None, "the body is not JSON"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_given_bad_body_when_parsed_then_bad_request_naming_every_problem(
    body: object, expected: str
) -> None:
    with pytest.raises(LoraflowError) as refused:
        GenerationRequest.from_body(body if body is None or isinstance(body, str) else json.dumps(body))

    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert expected in refused.value.message


def test_given_request_without_settings_when_resolved_then_the_job_preview_settings() -> None:
    request = GenerationRequest.model_validate({"prompts": ["a"], "seed": 0})

    settings = generation_settings(completed_job(), request)

    assert (settings.steps, settings.resolution, settings.seed, settings.lora_scale) == (20, 512, 0, 1.0)
    assert (settings.negative_prompt, settings.guidance) == (None, None)


@pytest.mark.parametrize(("family", "refused"), [("flux2_klein", True), ("flux1", False), (None, False)])
def test_given_negative_prompt_when_the_jobs_family_takes_none_then_bad_request_before_rendering(
    family: str | None, refused: bool
) -> None:
    request = GenerationRequest.model_validate({"prompts": ["a"], "negative_prompt": "blurry"})
    job = completed_job(model_family=family)

    if not refused:  # a family that takes one, or one not recorded (the endpoint still refuses)
        assert generation_settings(job, request).negative_prompt == "blurry"
        return
    with pytest.raises(LoraflowError) as error:
        generation_settings(job, request)
    assert error.value.code is ErrorCode.BAD_REQUEST
    assert "FLUX.2 klein takes no negative_prompt" in error.value.message


def test_given_request_over_the_preview_budget_when_resolved_then_bad_request_with_the_estimate() -> None:
    request = GenerationRequest.model_validate({"prompts": ["a"] * 8, "steps": 150, "resolution": 1024})

    with pytest.raises(LoraflowError) as refused:
        generation_settings(completed_job(), request)

    assert refused.value.code is ErrorCode.BAD_REQUEST
    assert "estimated at 1258 s of rendering, the limit is 1200 s" in refused.value.message


@pytest.mark.parametrize("status", [JobStatus.TRAINING, JobStatus.FAILED, JobStatus.CANCELLED])
def test_given_job_not_completed_when_generation_added_then_state_conflict(status: JobStatus) -> None:
    with pytest.raises(JobStateConflict):
        with_new_generation(completed_job(status=status), generation(), NOW)


def test_given_pending_generations_when_one_more_added_then_refused_at_the_cap_but_expired_ones_free() -> (
    None
):
    job = completed_job(generations=[generation() for _ in range(MAX_PENDING_GENERATIONS)])

    with pytest.raises(TooManyGenerations) as refused:
        with_new_generation(job, generation(), NOW)
    later = NOW + timedelta(seconds=GENERATION_EXPIRY_S + 1)
    added = with_new_generation(job, generation(later), later)

    assert refused.value.code is ErrorCode.TOO_MANY_GENERATIONS
    assert len(added) == MAX_PENDING_GENERATIONS + 1 and added[0].created_at > added[1].created_at


def test_given_many_generations_when_bounded_then_the_newest_within_count_and_bytes() -> None:
    small = [generation() for _ in range(MAX_STORED_GENERATIONS + 5)]
    huge = [generation(prompts=["界" * 1000] * 8, negative_prompt="界" * 1000) for _ in range(5)]

    assert bounded(small) == small[:MAX_STORED_GENERATIONS]
    kept = bounded(huge)
    assert 2 <= len(kept) < len(huge) and kept == huge[: len(kept)]  # the pending cap's worth always fits
    assert sum(len(g.model_dump_json().encode()) for g in kept) <= MAX_STORED_GENERATIONS_BYTES


def test_given_pending_generation_when_outcome_recorded_twice_then_the_second_changes_nothing() -> None:
    pending = generation()
    job = completed_job(generations=[pending])
    done = ended(
        pending,
        "2026-12-01T12:01:00.000Z",
        status=GenerationStatus.COMPLETED,
        images=[GeneratedImage(prompt="zqxj dog", s3_uri="s3://a/0.png")],
    )

    first = with_outcome(job, done)
    assert first is not None and first[0] == done
    failed = ended(pending, "2026-12-01T12:02:00.000Z", status=GenerationStatus.FAILED)
    assert with_outcome(job.model_copy(update={"generations": first}), failed) is None
    assert with_outcome(completed_job(), done) is None  # not (or no longer) on the job


def test_given_long_failure_reason_when_ended_then_the_stored_message_is_bounded() -> None:
    error = Problem(code=ErrorCode.PREVIEW_FAILED, path="", message="x" * 10_000)

    failed = ended(generation(), "2026-12-01T12:01:00.000Z", status=GenerationStatus.FAILED, error=error)

    assert failed.error is not None and len(failed.error.message) == 2000


def test_given_job_with_a_mirrored_hub_model_when_render_requested_then_lora_only_from_the_mirror() -> None:
    source = BaseModelSource(repo="owner/model", commit="a" * 40, mirror_s3_uri="s3://artifacts/mirror/")
    pending = generation(lora_scale=-0.5, guidance=3.5, negative_prompt="blurry")

    request = render_request(completed_job(base_model_source=source), pending, "artifacts")

    assert request == PreviewRequest(
        job_id=JOB_ID,
        base_model="s3://artifacts/mirror/",
        lora_s3_uri=LORA,
        prompts=["zqxj dog"],
        steps=20,
        resolution=512,
        seed=3,
        output_s3_prefix=f"s3://artifacts/jobs/{JOB_ID}/generations/{pending.generation_id}/",
        render_base=False,
        lora_scale=-0.5,
        negative_prompt="blurry",
        guidance=3.5,
    )


def test_given_concurrent_change_when_generations_written_then_retried_on_the_fresh_job_and_updated_at_kept(
    repository: JobRepository,
) -> None:
    repository.claim(completed_job())
    racing = generation()
    calls: list[int] = []

    def add(job: Job) -> list[Generation]:
        calls.append(len(job.generations))
        if len(calls) == 1:  # another request records its generation between this read and write
            repository.change_generations(JOB_ID, lambda current: [racing, *current.generations])
        return [generation(), *job.generations]

    written = repository.change_generations(JOB_ID, add)

    assert written is not None and calls == [0, 1]
    assert [g.generation_id for g in written.generations][1:] == [racing.generation_id]
    assert written.generations_revision == 2 and written.updated_at == completed_job().updated_at
    assert repository.change_generations(JOB_ID, lambda job: None) is None
