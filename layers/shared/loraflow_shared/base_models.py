"""Base models as a cached, pinned asset of the stack: the names and records every component shares.

A Hub model (`owner/name`, optionally `@revision`) is resolved to an exact commit at ingest. The first job
that trains on that commit mirrors the files its pipeline needs to
`s3://<ArtifactsBucket>/base-models/hub/<owner>/<name>@<commit>/`, and publishes the mirror by writing its
manifest last: a mirror without a manifest (partial, or being written) is never used. Later jobs get the
mirror as the training job's `base_model` input channel and the preview endpoint loads it from S3.
Only one job writes a mirror at a time: it holds a lease object (an S3 conditional write); the others use
the Hub once meanwhile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

HUB_MIRROR_PREFIX = "base-models/hub/"
MIRROR_LEASE_PREFIX = "base-models/leases/"
MANIFEST_FILE = "loraflow-mirror.json"  # written last: its presence publishes the mirror
# The training job's input channels: the dataset prefix, and a mirrored base model when there is one.
DATASET_CHANNEL = "dataset"
BASE_MODEL_CHANNEL = "base_model"
# Hub repo ids: `owner/name`, letters, digits, `-`, `_`, `.` (the Hub's own rule, 96 characters at most).
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")  # a branch, tag or commit
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NOT_HUB_PREFIXES = ("s3://", "http://", "https://", "/", ".", "~")


@dataclass(frozen=True)
class HubModel:
    repo: str
    revision: str | None = None  # None: the repository's default branch

    @property
    def reference(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo

    @property
    def is_pinned(self) -> bool:
        return self.revision is not None and _COMMIT.match(self.revision) is not None


def parse_hub_model(reference: str) -> HubModel | None:
    """The Hub model a base-model reference names, None for S3 URIs, URLs, local paths and non-ids."""
    if reference.startswith(_NOT_HUB_PREFIXES) or "\\" in reference:
        return None
    repo, at, revision = reference.partition("@")
    if not _REPO.match(repo) or (at and not _REVISION.match(revision)):
        return None
    return HubModel(repo, revision or None)


def pinned(repo: str, commit: str) -> str:
    """The reference loaders accept for one exact commit: `owner/name@<commit>`."""
    return f"{repo}@{commit}"


def mirror_prefix(repo: str, commit: str) -> str:
    return f"{HUB_MIRROR_PREFIX}{repo}@{commit}/"


def lease_key(repo: str, commit: str) -> str:
    return f"{MIRROR_LEASE_PREFIX}{repo}@{commit}.json"


def mirror_from_manifest_key(key: str) -> tuple[str, str] | None:
    """`(repo, commit)` of a manifest key `base-models/hub/<owner>/<name>@<commit>/loraflow-mirror.json`."""
    if not key.startswith(HUB_MIRROR_PREFIX) or not key.endswith("/" + MANIFEST_FILE):
        return None
    repo, _, commit = key[len(HUB_MIRROR_PREFIX) : -len(MANIFEST_FILE) - 1].rpartition("@")
    return (repo, commit) if _REPO.match(repo) and _COMMIT.match(commit) else None


class MirrorManifest(BaseModel):
    """What a published mirror holds: every file with its size, so a reader can tell it is complete."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    repo: str
    commit: str
    revision: str | None = None  # what the first job asked for (a branch or tag), None: the default
    files: dict[str, int]  # path relative to the mirror prefix -> size in bytes
    mirrored_at: str
    mirrored_by: str  # the job id (or `loraflow models pull`) that wrote it

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


class MirrorLease(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    holder: str  # the job id writing the mirror
    expires_at: str  # ISO 8601 UTC; after it another job may take the lease over


class BaseModelSource(BaseModel):
    """Where a job's Hub base model came from, recorded on the job so its LoRA is reproducible."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    repo: str
    revision: str | None = None  # as the config asked (None: the default branch)
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    # Set once the job trains from the stack's mirror (or publishes it): s3://.../<repo>@<commit>/.
    mirror_s3_uri: str | None = None

    @property
    def pinned_reference(self) -> str:
        return pinned(self.repo, self.commit)
