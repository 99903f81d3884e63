"""How much does validating an upload read, and how fast is it?

300 photo-like 1024x1024 images (JPEG and PNG) in moto S3, listed and validated through
``validate_dataset`` with the same S3 reader and listing the ingest function uses.
"""

import os
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from loraflow_shared.dataset.images import HEAD_BYTES, TAIL_BYTES
from loraflow_shared.dataset.validate import validate_dataset
from loraflow_shared.s3 import S3ObjectReader, list_objects
from moto import mock_aws
from PIL import Image

IMAGE_COUNT = 300
PNG_EVERY = 5  # one image in five is PNG, the rest JPEG (quality 90), like typical photo uploads
SIDE = 1024
CACHE = Path(os.environ.get("LORAFLOW_BENCH_CACHE", "/tmp/loraflow-bench/validation-v1"))
BUCKET = "bench-datasets"
DATASET = "bench-set"
CONFIG = b'[training_arguments]\nresolution = "1024"\nnetwork_dim = 16\n'


def run() -> list[dict[str, Any]]:
    images = _dataset_images()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=f"{DATASET}/config.toml", Body=CONFIG)
        for path in images:
            client.put_object(Bucket=BUCKET, Key=f"{DATASET}/60_bnch/{path.name}", Body=path.read_bytes())
        started = time.perf_counter()
        objects = list_objects(client, BUCKET, f"{DATASET}/")
        report = validate_dataset(DATASET, objects, S3ObjectReader(client, BUCKET))
        seconds = time.perf_counter() - started
    if not report.accepted or report.image_count != IMAGE_COUNT:
        raise RuntimeError(f"benchmark dataset was not accepted: {report.errors[:3]}")
    total_bytes = sum(path.stat().st_size for path in images)
    png_count = len([path for path in images if path.suffix == ".png"])
    mix = f"{IMAGE_COUNT - png_count} JPEG q90 + {png_count} PNG, {SIDE}x{SIDE}"
    return [
        {
            "name": "validation_bytes_per_image",
            "value": round(report.bytes_read / IMAGE_COUNT),
            "unit": "bytes",
            "target": 131072,
            "notes": (
                f"{mix}; {total_bytes / IMAGE_COUNT / 1e6:.2f} MB per image on average; reads the "
                f"first {HEAD_BYTES} and last {TAIL_BYTES} bytes of each image plus the config "
                "(counted in)"
            ),
        },
        {
            "name": "validation_images_per_second",
            "value": round(IMAGE_COUNT / seconds, 1),
            "unit": "images/s",
            "target": None,
            "notes": (
                f"{mix}; listing + validate_dataset against in-process moto S3 (16 reader threads), "
                f"{seconds:.2f} s; on AWS each ranged GET is a network round trip instead"
            ),
        },
    ]


def _dataset_images() -> list[Path]:
    """Generate the images once and keep them under CACHE for later runs."""
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = [
        CACHE / (f"{index:03d}.png" if index % PNG_EVERY == 0 else f"{index:03d}.jpg")
        for index in range(IMAGE_COUNT)
    ]
    missing = [path for path in paths if not path.exists()]
    if missing:
        noise = np.random.default_rng(0).normal(0, 6, size=(SIDE * 2, SIDE * 2, 3)).astype(np.float32)
        for path in missing:
            _write_image(path, int(path.stem), noise)
    return paths


def _write_image(path: Path, seed: int, noise: np.ndarray) -> None:
    """Photo-like content: a random colour gradient, a sensor-like noise crop, no two alike."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / (SIDE - 1)
    low, high = rng.uniform(0, 120, size=3), rng.uniform(120, 255, size=3)
    mix = (xs * rng.uniform(0.2, 1) + ys * rng.uniform(0.2, 1))[..., None] / 2
    top, left = (int(value) for value in rng.integers(0, SIDE, size=2))
    pixels = low + (high - low) * mix + noise[top : top + SIDE, left : left + SIDE]
    buffer = BytesIO()
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if path.suffix == ".png":
        image.save(buffer, "PNG", compress_level=1)
    else:
        image.save(buffer, "JPEG", quality=90)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)  # a run killed midway never leaves a half-written cached image
