from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from loraflow_diffusion.families import SupportedPipeline, family_of
from loraflow_diffusion.models import load_pipeline
from loraflow_shared.errors import ErrorCode, LoraflowError
from safetensors.torch import save_file

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

CPU = torch.device("cpu")


def _load(ref: str, cache_dir: Path) -> SupportedPipeline:
    return load_pipeline(ref, device=CPU, dtype=torch.float32, cache_dir=cache_dir)


def _load_error(ref: str, cache_dir: Path) -> LoraflowError:
    with pytest.raises(LoraflowError) as caught:
        _load(ref, cache_dir)
    assert caught.value.code == ErrorCode.MODEL_LOAD_FAILED
    assert repr(ref) in caught.value.message
    return caught.value


def _upload_folder(folder: Path, bucket: str, prefix: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in folder.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}{path.relative_to(folder).as_posix()}")


def test_given_local_diffusers_dir_when_loaded_then_sd15_pipeline(tiny_model: Path, tmp_path: Path) -> None:
    pipe = _load(str(tiny_model), tmp_path)

    assert isinstance(pipe, StableDiffusionPipeline)
    assert family_of(pipe).name == "sd15"
    assert pipe.device == CPU and pipe.unet.dtype == torch.float32


def test_given_s3_prefix_when_loaded_twice_then_downloaded_once(
    aws: None, tiny_model: Path, tmp_path: Path
) -> None:
    _upload_folder(tiny_model, "models", "base-models/tiny/")
    uri = "s3://models/base-models/tiny/"

    first = _load(uri, tmp_path)
    boto3.resource("s3").Bucket("models").objects.all().delete()  # a second download would now fail
    second = _load(uri, tmp_path)

    assert isinstance(first, StableDiffusionPipeline) and isinstance(second, StableDiffusionPipeline)
    assert torch.equal(first.unet.conv_in.weight, second.unet.conv_in.weight)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("s3-")]) == 1


def test_given_empty_s3_prefix_when_loaded_then_model_load_failed(aws: None, tmp_path: Path) -> None:
    boto3.client("s3").create_bucket(Bucket="models")

    error = _load_error("s3://models/nothing-here/", tmp_path)

    assert "no objects under" in error.message
    assert not any(tmp_path.iterdir()), "a failed download must leave no cache entry"


def test_given_missing_bucket_when_loaded_then_model_load_failed_naming_s3_error(
    aws: None, tmp_path: Path
) -> None:
    error = _load_error("s3://no-such-bucket/model.safetensors", tmp_path)

    assert "NoSuchBucket" in error.message


def test_given_missing_local_path_when_loaded_then_model_load_failed(tmp_path: Path) -> None:
    error = _load_error(str(tmp_path / "does-not-exist"), tmp_path)

    assert error.message.endswith("no such file or directory")


def test_given_folder_without_model_index_when_loaded_then_model_load_failed(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    error = _load_error(str(tmp_path / "empty"), tmp_path)

    assert "model_index.json" in error.message


def test_given_unsupported_pipeline_class_when_loaded_then_model_load_failed(tmp_path: Path) -> None:
    folder = tmp_path / "sd3"
    folder.mkdir()
    index = {"_class_name": "StableDiffusion3Pipeline"}
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")

    error = _load_error(str(folder), tmp_path)

    assert "'StableDiffusion3Pipeline' is not supported" in error.message
    assert "'FluxPipeline'" in error.message and "'ZImagePipeline'" in error.message  # what is supported


def test_given_corrupt_safetensors_file_when_loaded_then_model_load_failed(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"\x00" * 64)

    error = _load_error(str(checkpoint), tmp_path)

    assert "SafetensorError" in error.message


def test_given_single_file_of_unknown_family_when_loaded_then_model_load_failed(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(checkpoint))

    error = _load_error(str(checkpoint), tmp_path)

    assert "neither Stable Diffusion 1.x/2.x nor SDXL" in error.message


def test_given_hub_id_and_offline_mode_when_loaded_then_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()

    _load_error("no-such-org/no-such-model", tmp_path)

    assert time.monotonic() - started < 10


def test_given_reference_that_is_no_path_nor_hub_id_when_loaded_then_model_load_failed(
    tmp_path: Path,
) -> None:
    error = _load_error("not a model!", tmp_path)

    assert "not a local path, an s3:// URI or a Hugging Face model id" in error.message


def _weightless_folder(root: Path, class_name: str) -> Path:
    """A diffusers folder with only its model_index.json: loading any weight from it would fail."""
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name}), encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("class_name", "expect_family", "expected"),
    [
        ("StableDiffusionPipeline", "sdxl", "config says sdxl = true but {ref} is an SD 1.x/2.x model"),
        ("StableDiffusionXLPipeline", "sd15", "config says sdxl = false but {ref} is an SDXL model"),
    ],
)
def test_given_folder_of_other_family_than_config_says_when_loaded_then_fails_before_reading_weights(
    tmp_path: Path, class_name: str, expect_family: str, expected: str
) -> None:
    ref = str(_weightless_folder(tmp_path / "model", class_name))

    with pytest.raises(LoraflowError) as caught:
        load_pipeline(ref, device=CPU, dtype=torch.float32, cache_dir=tmp_path, expect_family=expect_family)

    assert caught.value.code == ErrorCode.MODEL_LOAD_FAILED
    assert caught.value.message.startswith(expected.format(ref=repr(ref)))
    assert "leave sdxl out to detect" in caught.value.message


def test_given_sd15_single_file_without_config_and_config_saying_sdxl_when_loaded_then_fails_before_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Recognised by its keys alone: no config folder, and a Hub that must not be asked.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = tmp_path / "model.safetensors"
    save_file(
        {"model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(1)}, str(checkpoint)
    )

    with pytest.raises(LoraflowError) as caught:
        load_pipeline(
            str(checkpoint), device=CPU, dtype=torch.float32, cache_dir=tmp_path, expect_family="sdxl"
        )

    assert caught.value.message.startswith(
        f"config says sdxl = true but {str(checkpoint)!r} is an SD 1.x/2.x"
    )


def test_given_sd15_folder_and_config_saying_sd15_when_loaded_then_sd15_pipeline(
    tiny_model: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(
        str(tiny_model), device=CPU, dtype=torch.float32, cache_dir=tmp_path, expect_family="sd15"
    )

    assert isinstance(pipe, StableDiffusionPipeline)
