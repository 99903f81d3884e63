"""Housekeeping of the stack's base-model copies (`loraflow models`): which are cached, which jobs use them,
and deleting one only when no unfinished job is pinned to it."""

from __future__ import annotations

from dataclasses import dataclass

from loraflow_shared.base_model_mirror import MirrorStore
from loraflow_shared.base_models import MirrorManifest
from loraflow_shared.jobs.model import Job
from loraflow_shared.jobs.repository import JobRepository


class BaseModelInUse(Exception):
    def __init__(self, repo: str, commit: str, job_ids: list[str]) -> None:
        super().__init__(
            f"{repo}@{commit} is used by unfinished job(s) {', '.join(job_ids)}: delete it once they end"
        )
        self.job_ids = job_ids


@dataclass(frozen=True)
class CachedModel:
    manifest: MirrorManifest
    uri: str
    used_by: list[str]  # unfinished jobs pinned to this commit


class BaseModelCache:
    def __init__(self, store: MirrorStore, repository: JobRepository) -> None:
        self._store = store
        self._repository = repository

    def all(self) -> list[CachedModel]:
        unfinished = self._repository.unfinished()
        return [
            CachedModel(m, self._store.uri(m.repo, m.commit), _pinned_to(unfinished, m.repo, m.commit))
            for m in sorted(self._store.all_published(), key=lambda m: (m.repo, m.mirrored_at))
        ]

    def cached(self, repo: str, commit: str | None = None) -> list[MirrorManifest]:
        return [m for m in self._store.all_published() if m.repo == repo and commit in (None, m.commit)]

    def delete(self, manifest: MirrorManifest) -> int:
        """Unpublish, check again (a job may have started on it meanwhile: then publish it back), delete
        the files; returns how many objects went. BaseModelInUse while an unfinished job is pinned to it."""
        repo, commit = manifest.repo, manifest.commit
        users = _pinned_to(self._repository.unfinished(), repo, commit)
        if users:
            raise BaseModelInUse(repo, commit, users)
        self._store.unpublish(repo, commit)
        started = _pinned_to(self._repository.unfinished(), repo, commit)
        if started:
            self._store.publish(manifest)
            raise BaseModelInUse(repo, commit, started)
        return self._store.delete(repo, commit)


def _pinned_to(jobs: list[Job], repo: str, commit: str) -> list[str]:
    return sorted(
        job.job_id
        for job in jobs
        if job.base_model_source is not None
        and (job.base_model_source.repo, job.base_model_source.commit) == (repo, commit)
    )
