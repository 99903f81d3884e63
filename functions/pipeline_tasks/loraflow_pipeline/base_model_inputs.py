"""What a training job gets of its base model: the stack's published mirror as an input channel, or (for a
Hub model not mirrored yet) the pinned commit to download, with the mirror to write when the job holds the
mirror's lease. Another job writing the same mirror meanwhile means this one downloads from the Hub once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from loraflow_shared.base_models import BASE_MODEL_CHANNEL, DATASET_CHANNEL, BaseModelSource, MirrorManifest

# A mirror's writer keeps the lease this long: long enough for 40 GB from the Hub and to S3; a writer that
# died lets another job take over after it.
MIRROR_LEASE_SECONDS = 2 * 3600


class BaseModelMirrors(Protocol):
    def uri(self, repo: str, commit: str) -> str: ...

    def published(self, repo: str, commit: str) -> MirrorManifest | None: ...

    def acquire_lease(self, repo: str, commit: str, holder: str, ttl_seconds: int) -> bool: ...


@dataclass(frozen=True)
class BaseModelInputs:
    base_model: str  # the trainer's `base_model` hyperparameter: what it names in its outputs and loads
    mirror_write_uri: str  # where the trainer publishes the mirror ("" when it does not)
    channels: list[dict[str, Any]]  # CreateTrainingJob's InputDataConfig
    source: BaseModelSource | None  # the job's source, with mirror_s3_uri set when the mirror is used


def base_model_inputs(
    job_id: str,
    dataset_s3_uri: str,
    base_model: str,
    source: BaseModelSource | None,
    mirrors: BaseModelMirrors,
) -> BaseModelInputs:
    channels = [channel(DATASET_CHANNEL, dataset_s3_uri)]
    if source is None:  # an S3 folder or file, or a Hub model ingest could not pin: as the config says
        return BaseModelInputs(base_model, "", channels, None)
    uri = mirrors.uri(source.repo, source.commit)
    if mirrors.published(source.repo, source.commit) is not None:
        channels.append(channel(BASE_MODEL_CHANNEL, uri))
        return BaseModelInputs(
            source.pinned_reference, "", channels, source.model_copy(update={"mirror_s3_uri": uri})
        )
    writes = mirrors.acquire_lease(source.repo, source.commit, job_id, MIRROR_LEASE_SECONDS)
    return BaseModelInputs(source.pinned_reference, uri if writes else "", channels, source)


def channel(name: str, s3_uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": s3_uri,
                "S3DataDistributionType": "FullyReplicated",
            }
        },
    }
