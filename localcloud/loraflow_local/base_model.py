"""The local base models: every family's tiny pipeline (`loraflow_diffusion.tiny_models`), built once per
state dir and uploaded to `s3://<ArtifactsBucket>/base-models/<name>/`; `toy-world` (the toy world's fitted
base, `loraflow_diffusion.toy_world`) is the default.

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

BASE_MODELS_PREFIX = "base-models/"
DEFAULT_TINY_MODEL = "toy-world"  # loraflow_diffusion.tiny_models.DEFAULT_TINY_MODEL (torch-free here)
_BUILD_SCRIPT = (
    "import sys, pathlib; from loraflow_diffusion.tiny_models import build_tiny_models; "
    "build_tiny_models(pathlib.Path(sys.argv[1]))"
)


def tiny_model_uri(artifacts_bucket: str, name: str = DEFAULT_TINY_MODEL) -> str:
    return f"s3://{artifacts_bucket}/{BASE_MODELS_PREFIX}{name}/"


def ensure_tiny_models(cache_dir: Path) -> list[Path]:
    """Build every tiny model into `cache_dir/<name>/` unless a complete build is already there."""
    done = cache_dir / ".complete"
    if not done.is_file():
        LOG.info("building the tiny base models in %s", cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, str(cache_dir)], check=True)
        done.touch()
    return sorted(path for path in cache_dir.iterdir() if path.is_dir())


def upload_folder(s3: Any, folder: Path, uri: str) -> int:
    """Upload every file under `folder` to the `s3://bucket/prefix/` URI; return the count."""
    bucket, prefix = split_s3_uri(uri)
    files = [path for path in sorted(folder.rglob("*")) if path.is_file() and path.name != ".complete"]
    for path in files:
        s3.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())
    return len(files)
