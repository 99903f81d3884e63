from __future__ import annotations

import io
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from diffusion_kit import TrainingRun
from loraflow_diffusion.families import SupportedPipeline
from loraflow_diffusion.models import load_pipeline
from loraflow_inference.contact_sheet import CELL, HEADER, LABEL_WIDTH, PAD, fit_cell
from loraflow_inference.handler import PreviewRenderer, render_prompts
from loraflow_shared.contracts import CONTACT_SHEET_FILE, PreviewRequest
from loraflow_shared.errors import ErrorCode, LoraflowError
from PIL import Image

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

BUCKET = "artifacts"
LORA_URI = f"s3://{BUCKET}/jobs/job-1/lora/pytorch_lora_weights.safetensors"
PROMPTS = ["ohwx, a red circle", "a photo of sks dog", "sks dog in a garden"]


@pytest.fixture
def renderer(tmp_path: Path) -> PreviewRenderer:
    def loader(ref: str) -> SupportedPipeline:
        return load_pipeline(
            ref, device=torch.device("cpu"), dtype=torch.float32, cache_dir=tmp_path / "cache"
        )

    return PreviewRenderer(loader)


@pytest.fixture
def uploaded_lora(aws: None, training_run: TrainingRun) -> str:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(
        str(training_run.dirs.model / "pytorch_lora_weights.safetensors"),
        BUCKET,
        LORA_URI[len(f"s3://{BUCKET}/") :],
    )
    return LORA_URI


def _request(base_model: str, **changes: object) -> PreviewRequest:
    fields = {
        "job_id": "job-1",
        "base_model": base_model,
        "lora_s3_uri": LORA_URI,
        "prompts": PROMPTS,
        "steps": 2,
        "resolution": 64,
        "seed": 5,
        "output_s3_prefix": f"s3://{BUCKET}/jobs/job-1/previews/",
    }
    return PreviewRequest.model_validate({**fields, **changes})


def _download_png(uri: str) -> Image.Image:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


def test_given_n_prompts_when_rendered_then_n_pngs_of_the_right_size_in_s3(
    renderer: PreviewRenderer, uploaded_lora: str, tiny_model: Path
) -> None:
    response = renderer.render(_request(str(tiny_model)))

    assert response.job_id == "job-1"
    assert [p.prompt for p in response.previews] == PROMPTS
    assert [p.s3_uri for p in response.previews] == [
        f"s3://{BUCKET}/jobs/job-1/previews/{index}.png" for index in range(len(PROMPTS))
    ]
    for preview in response.previews:
        image = _download_png(preview.s3_uri)
        assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")


def test_given_lora_when_rendered_then_it_changes_the_picture_and_is_unloaded_after(
    renderer: PreviewRenderer, uploaded_lora: str, tiny_model: Path
) -> None:
    request = _request(str(tiny_model), prompts=PROMPTS[:1])
    pipe = renderer.pipeline(request.base_model)  # the cached pipeline the renderer will use
    before = render_prompts(pipe, request.prompts, request.steps, request.resolution, request.seed)[0]

    with_lora = _download_png(renderer.render(request).previews[0].s3_uri)
    after = render_prompts(pipe, request.prompts, request.steps, request.resolution, request.seed)[0]

    assert np.abs(np.asarray(with_lora, float) - np.asarray(before, float)).max() > 0
    assert np.array_equal(np.asarray(after), np.asarray(before))
    assert not pipe.get_list_adapters()


def test_given_lora_when_rendered_then_base_pictures_are_the_base_alone_and_the_sheet_holds_both(
    renderer: PreviewRenderer, uploaded_lora: str, tiny_model: Path
) -> None:
    request = _request(str(tiny_model), prompts=PROMPTS[:2])
    pipe = renderer.pipeline(request.base_model)
    base_alone = render_prompts(pipe, request.prompts, request.steps, request.resolution, request.seed)

    response = renderer.render(request)

    assert [p.base_s3_uri for p in response.previews] == [
        f"s3://{BUCKET}/jobs/job-1/previews/base-{index}.png" for index in range(2)
    ]
    for preview, expected in zip(response.previews, base_alone, strict=True):
        assert preview.base_s3_uri is not None
        assert np.array_equal(np.asarray(_download_png(preview.base_s3_uri)), np.asarray(expected))
    assert response.contact_sheet_s3_uri == f"s3://{BUCKET}/jobs/job-1/previews/{CONTACT_SHEET_FILE}"
    sheet = np.asarray(_download_png(response.contact_sheet_s3_uri))
    for row, preview in enumerate(response.previews):
        assert preview.base_s3_uri is not None
        for column, uri in enumerate((preview.base_s3_uri, preview.s3_uri)):
            cell = sheet_cell(sheet, row, column)
            assert np.array_equal(cell, np.asarray(fit_cell(_download_png(uri))))


def sheet_cell(sheet: np.ndarray, row: int, column: int) -> np.ndarray:
    top, left = HEADER + row * (CELL + PAD) + PAD, LABEL_WIDTH + PAD + column * (CELL + PAD)
    return sheet[top : top + CELL, left : left + CELL]


def test_given_missing_lora_when_rendered_then_preview_failed(
    renderer: PreviewRenderer, aws: None, tiny_model: Path
) -> None:
    boto3.client("s3").create_bucket(Bucket=BUCKET)

    with pytest.raises(LoraflowError) as caught:
        renderer.render(_request(str(tiny_model)))

    assert caught.value.code == ErrorCode.PREVIEW_FAILED
    assert LORA_URI in caught.value.message


def test_given_unloadable_base_model_when_rendered_then_model_load_failed(
    renderer: PreviewRenderer, uploaded_lora: str, tmp_path: Path
) -> None:
    with pytest.raises(LoraflowError) as caught:
        renderer.render(_request(str(tmp_path / "no-model")))

    assert caught.value.code == ErrorCode.MODEL_LOAD_FAILED


def test_given_two_base_models_when_rendered_then_only_the_latest_stays_cached(
    renderer: PreviewRenderer, uploaded_lora: str, tiny_model: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    copy.symlink_to(tiny_model, target_is_directory=True)
    first = renderer.pipeline(str(tiny_model))

    renderer.render(_request(str(copy), prompts=PROMPTS[:1]))

    assert renderer.pipeline(str(copy)) is not first
    assert renderer.cached_models == [str(copy)]


def _objects_under(prefix_uri: str) -> list[str]:
    bucket, _, prefix = prefix_uri.removeprefix("s3://").partition("/")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return sorted(item["Key"].removeprefix(prefix) for item in listed)


def test_given_generation_request_when_rendered_then_lora_pictures_only_without_base_or_sheet(
    renderer: PreviewRenderer, uploaded_lora: str, tiny_model: Path
) -> None:
    prefix = f"s3://{BUCKET}/jobs/job-1/generations/0123456789abcdef/"
    request = _request(str(tiny_model), prompts=PROMPTS[:2], render_base=False, output_s3_prefix=prefix)

    response = renderer.render(request)

    assert [(p.s3_uri, p.base_s3_uri) for p in response.previews] == [
        (f"{prefix}0.png", None),
        (f"{prefix}1.png", None),
    ]
    assert response.contact_sheet_s3_uri is None
    assert _objects_under(prefix) == ["0.png", "1.png"]


def test_given_lora_scale_when_rendered_then_0_is_the_base_alone_and_the_scale_changes_the_picture(
    renderer: PreviewRenderer, uploaded_lora: str, tiny_model: Path
) -> None:
    request = _request(str(tiny_model), prompts=PROMPTS[:1], render_base=False)
    pipe = renderer.pipeline(request.base_model)
    base = np.asarray(
        render_prompts(pipe, request.prompts, request.steps, request.resolution, request.seed)[0]
    )

    pictures = {}
    for scale in (0.0, 1.0, 2.0):
        rendered = renderer.render(request.model_copy(update={"lora_scale": scale}))
        pictures[scale] = np.asarray(_download_png(rendered.previews[0].s3_uri), float)

    assert np.array_equal(pictures[0.0], base)
    assert np.abs(pictures[1.0] - base).max() > 0 and np.abs(pictures[2.0] - pictures[1.0]).max() > 0
    assert not pipe.get_list_adapters()  # unloaded after each


def test_given_negative_prompt_and_guidance_when_rendered_then_the_pipeline_samples_with_them(
    renderer: PreviewRenderer, tiny_model: Path
) -> None:
    pipe = renderer.pipeline(str(tiny_model))
    chosen = {"negative_prompt": "blurry", "guidance": 2.0}

    rendered = render_prompts(pipe, PROMPTS[:1], steps=2, resolution=64, seed=5, **chosen)[0]
    default = render_prompts(pipe, PROMPTS[:1], steps=2, resolution=64, seed=5)[0]

    generator = torch.Generator("cpu").manual_seed(5)
    direct = pipe(
        PROMPTS[0],
        negative_prompt="blurry",
        guidance_scale=2.0,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
    ).images[0]
    assert np.array_equal(np.asarray(rendered), np.asarray(direct))
    assert not np.array_equal(np.asarray(rendered), np.asarray(default))
