"""The local default base model: the tiny SD pipeline, built once per state dir and uploaded to S3.

Built in a child process so torch never loads into the local cloud's own process.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from loraflow_local.s3_util import split_s3_uri

LOG = logging.getLogger(__name__)

TINY_MODEL_PREFIX = "base-models/tiny-sd/"
_BUILD_SCRIPT = (
    "import sys, pathlib; from loraflow_diffusion.tiny import build_tiny_sd; "
    "build_tiny_sd(pathlib.Path(sys.argv[1]))"
)


def tiny_model_uri(artifacts_bucket: str) -> str:
    return f"s3://{artifacts_bucket}/{TINY_MODEL_PREFIX}"


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Build the tiny pipeline into `cache_dir` unless a complete build is already there."""
    done = cache_dir / ".complete"
    if not done.is_file():
        LOG.info("building the tiny base model in %s", cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(cache_dir)], check=True)
        done.touch()
    return cache_dir


def upload_folder(s3: Any, folder: Path, uri: str) -> int:
    """Upload every file under `folder` to the `s3://bucket/prefix/` URI; return the count."""
    bucket, prefix = split_s3_uri(uri)
    files = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != ".complete"]
    for path in files:
        s3.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())
    return len(files)
