"""One local cloud for the user's surfaces (the CLI and the gallery): it starts for the first test of
this folder and stops after its last, before the other integration tests start theirs (moto's state is
process-wide: one local cloud per process)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

CLI_DATASET = "cli-demo"


@pytest.fixture(scope="package")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local cloud for the user's surfaces (CLI, gallery): its state folder, as `--local` takes it."""
    from loraflow_local.cloud import LocalCloud

    root = tmp_path_factory.mktemp("cli")
    with LocalCloud(root / "state") as cloud:
        yield cloud.state_dir


@pytest.fixture(scope="package")
def trained(state: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """`loraflow train` on the demo's dataset (few steps), followed to the end, files downloaded."""
    from loraflow_local.cli import main
    from loraflow_local.sample_dataset import write_sample_dataset

    root = tmp_path_factory.mktemp("cli-train")
    folder = write_sample_dataset(root, max_train_steps=30, preview_steps=4)
    out = root / "out"
    printed = io.StringIO()
    argv = ["train", str(folder), "--dataset", CLI_DATASET, "--local", str(state), "--wait", "--download"]
    argv.append(str(out))
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    lines = printed.getvalue().splitlines()
    return {"code": code, "lines": lines, "out": out, "folder": folder, "dataset": CLI_DATASET}
