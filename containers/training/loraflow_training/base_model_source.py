"""Where the trainer loads its base model from (`loraflow_shared.base_models`): the stack's mirror when the
job was given it as the `base_model` channel; else a Hub model pinned to a commit, downloaded once into the
model cache and, when this job holds the mirror's lease, uploaded to the mirror before training starts (so
the next job of any user of this stack trains from S3); else the reference as the config named it."""

from __future__ import annotations

import logging
from pathlib import Path

import boto3
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from loraflow_diffusion.sagemaker_env import TrainingPaths
from loraflow_shared.base_model_mirror import MirrorStore
from loraflow_shared.base_models import BASE_MODEL_CHANNEL, HubModel, parse_hub_model
from loraflow_shared.errors import ErrorCode, LoraflowError
from loraflow_shared.families import MODEL_INDEX_FILE
from loraflow_shared.s3 import parse_s3_uri

logger = logging.getLogger(__name__)


def base_model_to_load(
    paths: TrainingPaths, base_model: str, mirror_uri: str, job_id: str
) -> tuple[str, list[str]]:
    """The reference to load, and notes for the report (a mirror that could not be written)."""
    channel = paths.channel(BASE_MODEL_CHANNEL)
    if (channel / MODEL_INDEX_FILE).is_file():
        logger.info(
            "base model %s from the stack's mirror (input channel %s)", base_model, BASE_MODEL_CHANNEL
        )
        return str(channel), []
    hub = parse_hub_model(base_model)
    if not mirror_uri or hub is None or not hub.is_pinned:
        return base_model, []
    return _download_and_mirror(paths, hub, mirror_uri, job_id)


def _download_and_mirror(
    paths: TrainingPaths, hub: HubModel, mirror_uri: str, job_id: str
) -> tuple[str, list[str]]:
    commit = str(hub.revision)
    store = MirrorStore(boto3.client("s3"), parse_s3_uri(mirror_uri)[0])
    try:
        folder = Path(DiffusionPipeline.download(hub.repo, revision=commit, cache_dir=paths.model_cache_dir))
    except Exception as exc:  # released: the next job on this commit may write the copy
        store.release_lease(hub.repo, commit, job_id)
        raise LoraflowError(
            ErrorCode.MODEL_LOAD_FAILED,
            f"cannot download base model {hub.reference!r}: {type(exc).__name__}: {exc}",
        ) from exc
    try:
        manifest = store.upload(folder, hub.repo, commit, revision=None, holder=job_id)
    except Exception as exc:  # the job trains anyway; the next one downloads from the Hub again
        logger.exception("copying %s to %s failed", hub.reference, mirror_uri)
        store.release_lease(hub.repo, commit, job_id)
        return str(folder), [f"the base model could not be copied to {mirror_uri} ({type(exc).__name__})"]
    logger.info(
        "copied %s to %s: %d files, %d bytes",
        hub.reference,
        mirror_uri,
        len(manifest.files),
        manifest.total_bytes,
    )
    return str(folder), []
