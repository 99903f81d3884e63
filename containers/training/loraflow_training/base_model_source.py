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
from loraflow_shared.base_models import BASE_MODEL_CHANNEL, parse_hub_model
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
    folder = Path(
        DiffusionPipeline.download(hub.repo, revision=hub.revision, cache_dir=paths.model_cache_dir)
    )
    bucket, _ = parse_s3_uri(mirror_uri)
    store = MirrorStore(boto3.client("s3"), bucket)
    try:
        manifest = store.upload(folder, hub.repo, str(hub.revision), revision=None, holder=job_id)
    except Exception as exc:  # the job trains anyway; the next one downloads from the Hub again
        logger.exception("mirroring %s to %s failed", base_model, mirror_uri)
        store.release_lease(hub.repo, str(hub.revision), job_id)
        return str(folder), [f"the base model could not be mirrored to {mirror_uri} ({type(exc).__name__})"]
    logger.info(
        "mirrored %s: %d files, %d bytes to %s",
        base_model,
        len(manifest.files),
        manifest.total_bytes,
        mirror_uri,
    )
    return str(folder), []
