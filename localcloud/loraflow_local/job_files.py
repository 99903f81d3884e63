"""A finished job's files, fetched through the API's presigned URLs into one folder: both LoRA files,
the training report, each preview (with the LoRA, and `-base` by the base model alone), the contact sheet
and the job's JSON. `loraflow download`, `loraflow train --download` and the demo use it."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from loraflow_local.jobs_api import download

CONTACT_SHEET_NAME = "contact-sheet.png"
JOB_FILE = "job.json"


def save_job_files(job: dict[str, Any], output: Path) -> list[Path]:
    """Write what the job has into `output`; return the files written."""
    output.mkdir(parents=True, exist_ok=True)
    job_file = output / JOB_FILE
    job_file.write_text(json.dumps(job, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written = [job_file]
    artifacts = job.get("artifacts") or {}
    for key in ("lora_diffusers_url", "lora_kohya_url", "training_report_url"):
        if artifacts.get(key):  # the kohya file keeps its `<output_name>.safetensors` name
            written.append(download(artifacts[key], output / _file_name(artifacts[key])))
    for index, preview in enumerate(job.get("previews") or []):
        written.append(download(preview["url"], output / "previews" / f"{index:02d}.png"))
        if preview.get("base_url"):  # the same prompt and seed by the base model alone
            written.append(download(preview["base_url"], output / "previews" / f"{index:02d}-base.png"))
    if job.get("contact_sheet_url"):
        written.append(download(job["contact_sheet_url"], output / CONTACT_SHEET_NAME))
    return written


def _file_name(url: str) -> str:
    return PurePosixPath(urlparse(url).path).name
