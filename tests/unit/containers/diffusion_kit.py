"""Helpers for the container tests (a module with a unique name: every test folder has a conftest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import torch
from loraflow_diffusion.single_file import config_dir_for
from PIL import Image, ImageDraw

REGION = "us-east-1"
CONFIG_FILE = "config.toml"
TRAIN_STEPS = 12  # logs at step 10 and at the end
# Two subsets: 3 images x 3 repeats and 4 images x 2 repeats = 17 samples per epoch.
SUBSETS = {"3_ohwx": 3, "2_sks dog": 4}
CONFIG_TOML = f"""\
[model_arguments]
pretrained_model_name_or_path = "ignored: the base_model hyperparameter decides"

[training_arguments]
resolution = 64
max_train_steps = {TRAIN_STEPS}
train_batch_size = 2
learning_rate = 1e-2
seed = 3
mixed_precision = "bf16"
cache_latents = true

[network_arguments]
network_dim = 4
network_alpha = 2  # not the rank: the saved LoRA must carry it
"""


def write_dataset(root: Path, seed: int = 0) -> Path:
    """A kohya dataset: 2 subset folders of 64-96 px generated images, a caption for the first of each."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for folder, count in SUBSETS.items():
        (root / folder).mkdir()
        for index in range(count):
            pixels = rng.integers(0, 255, size=(96, 80, 3), dtype=np.uint8)  # not square: exercises the crop
            image = Image.fromarray(pixels, "RGB")
            ImageDraw.Draw(image).ellipse((16, 16, 64, 64), fill=(220, 40, 40))
            image.save(root / folder / f"img{index}.png")
        (root / folder / "img0.txt").write_text(f"{folder.split('_', 1)[1]}, a red circle", encoding="utf-8")
    (root / CONFIG_FILE).write_text(CONFIG_TOML, encoding="utf-8")
    return root


@dataclass(frozen=True)
class SageMakerDirs:
    root: Path
    dataset: Path
    model: Path
    output: Path

    def env(self) -> dict[str, str]:
        """The variables the local cloud sets for a training job."""
        return {
            "SM_INPUT_DIR": str(self.root / "input"),
            "SM_INPUT_CONFIG_DIR": str(self.root / "input" / "config"),
            "SM_CHANNEL_DATASET": str(self.dataset),
            "SM_MODEL_DIR": str(self.model),
            "SM_OUTPUT_DIR": str(self.output),
            "SM_OUTPUT_DATA_DIR": str(self.output / "data"),
            "SM_CHECKPOINT_DIR": str(self.root / "checkpoints"),
        }

    @property
    def failure(self) -> dict[str, str]:
        return json.loads((self.output / "failure").read_text(encoding="utf-8"))


def make_sagemaker_dirs(root: Path, base_model: str, dataset_seed: int = 0) -> SageMakerDirs:
    dirs = SageMakerDirs(
        root,
        write_dataset(root / "input" / "data" / "dataset", dataset_seed),
        root / "model",
        root / "output",
    )
    write_hyperparameters(root, CONFIG_FILE, base_model, "job-1")
    return dirs


def write_hyperparameters(root: Path, config_file: str, base_model: str, job_id: str) -> None:
    """The job's `input/config/hyperparameters.json`, as the pipeline's training task sets them."""
    config_dir = root / "input" / "config"
    config_dir.mkdir(parents=True)
    hyperparameters = {"config_file": config_file, "base_model": base_model, "job_id": job_id}
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters), encoding="utf-8")


@dataclass(frozen=True)
class TrainingRun:
    dirs: SageMakerDirs
    exit_code: int
    stdout: str


def render_ohwx(pipe: Any) -> np.ndarray:
    """A fixed 3-step 64 px render of "ohwx, a red circle" (seed 0), for comparing two ways of loading."""
    generator = torch.Generator("cpu").manual_seed(0)
    result = pipe(
        "ohwx, a red circle",
        num_inference_steps=3,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
    )
    return np.asarray(result.images[0])


def assert_same_weights(loaded: Any, reference: Any, components: Sequence[str]) -> None:
    """The named components of two pipelines hold bit-identical state dicts."""
    for name in components:
        expected, actual = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert actual.keys() == expected.keys(), name
        assert all(torch.equal(actual[key], expected[key]) for key in expected), name


def upload_checkpoint_with_config(checkpoint: Path, bucket: str, prefix: str) -> str:
    """Upload a single-file checkpoint and its config folder under `prefix`; return the checkpoint's URI."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=bucket)
    for path in [checkpoint, *config_dir_for(checkpoint).rglob("*")]:
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(checkpoint.parent).as_posix()}")
    return f"s3://{bucket}/{prefix}/{checkpoint.name}"


def kill_after_first_checkpoint(dirs: SageMakerDirs) -> None:
    """Start the trainer as SageMaker would and SIGKILL it (no goodbye) once a checkpoint exists."""
    env = {**os.environ, **dirs.env()}
    process = subprocess.Popen(
        [sys.executable, "-m", "loraflow_training", "train"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = dirs.root / "checkpoints" / "state"
    deadline = time.monotonic() + 300
    try:
        while not any(state.glob("step-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the trainer ended before it could be interrupted"
