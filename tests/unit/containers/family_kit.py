"""Checks every family's training tests share: previews render through the preview endpoint's renderer."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import torch
from loraflow_diffusion.families import SupportedPipeline
from loraflow_diffusion.models import load_pipeline
from loraflow_inference.handler import PreviewRenderer
from loraflow_shared.contracts import PreviewRequest
from PIL import Image

CPU = torch.device("cpu")
PREVIEW_PROMPTS = ["ohwx", "a photo of ohwx"]


def assert_previews_render(model: Path, lora: Path, tmp_path: Path, side: int = 64) -> None:
    """The renderer takes the family's base and its diffusers-format LoRA (from S3, as deployed) and writes
    one PNG per prompt at the asked size (call inside moto, the `aws` fixture)."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="artifacts")
    s3.upload_file(str(lora), "artifacts", "jobs/j/lora/pytorch_lora_weights.safetensors")

    def loader(ref: str) -> SupportedPipeline:
        return load_pipeline(ref, device=CPU, dtype=torch.float32, cache_dir=tmp_path / "cache")

    response = PreviewRenderer(loader).render(
        PreviewRequest(
            job_id="j",
            base_model=str(model),
            lora_s3_uri="s3://artifacts/jobs/j/lora/pytorch_lora_weights.safetensors",
            prompts=PREVIEW_PROMPTS,
            steps=2,
            resolution=side,
            seed=0,
            output_s3_prefix="s3://artifacts/jobs/j/previews/",
        )
    )

    indices = range(len(PREVIEW_PROMPTS))
    assert [p.s3_uri for p in response.previews] == [
        f"s3://artifacts/jobs/j/previews/{i}.png" for i in indices
    ]
    for index in indices:
        png = s3.get_object(Bucket="artifacts", Key=f"jobs/j/previews/{index}.png")["Body"].read()
        assert Image.open(io.BytesIO(png)).size == (side, side)
