"""`loraflow demo`: the whole pipeline on a generated sample dataset, end to end, on the local cloud,
driven the way a user drives it: `loraflow train DIR --wait --download OUT` against that cloud."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from loraflow_local.job_files import CONTACT_SHEET_NAME
from loraflow_local.sample_dataset import SAMPLE_DATASET_ID, write_sample_dataset

STATE_FOLDER = "localcloud"  # under the output folder: the demo's cloud, kept for the gallery
# The demo's job takes about 2 minutes on 2 CPU cores; a job still running after this is stuck, and the
# demo says so (exit 1) rather than wait for ever.
JOB_TIMEOUT_S = 600.0


def run_demo(output: Path, state_dir: Path | None = None) -> int:
    """Run the demo; the LoRA, previews, contact sheet and job JSON go into `output`. Exit code 0 only
    on COMPLETED. The cloud's state stays (default `output/localcloud`) so its gallery can be opened."""
    from loraflow_local.cli import main  # the user's command line (it imports this module)
    from loraflow_local.cloud import LocalCloud  # imported late: starting the cloud is the slow part

    started = time.monotonic()
    state = state_dir or output / STATE_FOLDER
    work = Path(tempfile.mkdtemp(prefix="loraflow-demo-"))
    try:
        # Fresh: a state folder kept from an earlier demo would hold the sample dataset's job already.
        with LocalCloud(state, fresh=True) as cloud:
            up = time.monotonic() - started
            print(f"local cloud up in {up:.1f}s: {cloud.endpoints['aws_endpoint_url']}")
            dataset = write_sample_dataset(work)
            argv = ["train", str(dataset), "--dataset", SAMPLE_DATASET_ID, "--local", str(cloud.state_dir)]
            print(f"$ loraflow {' '.join(argv)} --wait --download {output}")
            code = main([*argv, "--wait", "--download", str(output), "--timeout", f"{JOB_TIMEOUT_S:.0f}"])
            print(f"demo finished in {time.monotonic() - started:.1f}s")
            _print_where(output, state)
            return code
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_where(output: Path, state: Path) -> None:
    sheet = output / CONTACT_SHEET_NAME
    if sheet.is_file():
        print(f"contact sheet (a row per prompt: base model | with the LoRA): {sheet}")
    print(f"LoRA files, previews and job.json: {output}/")
    print(
        f"gallery: run `loraflow local up --state-dir {state}` and open the api_url it prints, with a "
        f"trailing / (the API key is in {state}/endpoints.json)"
    )
