"""The loopback Hub answers `huggingface_hub` and diffusers as the Hub does: same files, one commit per
folder, the Hub's errors, gating by token, and byte counters that prove when a cache answered instead.

`huggingface_hub` reads `HF_ENDPOINT` at import, so in-process calls pass `endpoint=` and the diffusers
path (which cannot) runs in a child process started with `HF_ENDPOINT`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from loraflow_local.loopback_hub import LoopbackHub

REPO = "loraflow/tiny-sd"
GATED = "loraflow/tiny-sd-gated"
TOKEN = "hf_loopback_test_token"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraflow_diffusion.tiny_models import TINY_MODELS

    _, build = TINY_MODELS["tiny-sd"]
    return build(tmp_path_factory.mktemp("model") / "tiny-sd")


@pytest.fixture
def hub(pipeline: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackHub]:
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a developer's token must not unlock the gated repo
    with LoopbackHub({REPO: pipeline, GATED: pipeline}, token=TOKEN, gated=[GATED]) as served:
        yield served


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _download(
    hub: LoopbackHub,
    cache: Path,
    repo: str = REPO,
    revision: str | None = None,
    token: bool | str | None = None,
) -> Path:
    return Path(
        snapshot_download(repo, revision=revision, cache_dir=cache, endpoint=hub.endpoint, token=token)
    )


def test_given_served_pipeline_when_downloaded_with_hf_endpoint_then_files_equal_and_bytes_counted(
    hub: LoopbackHub, pipeline: Path, tmp_path: Path
) -> None:
    folder = _download(hub, tmp_path / "cache")

    source = _files(pipeline)
    assert _files(folder) == source
    assert folder.name == hub.commit(REPO)
    assert hub.bytes_served == sum(len(data) for data in source.values())
    assert hub.file_requests == len(source)


def test_given_downloaded_pipeline_when_downloaded_again_into_same_cache_then_no_file_bytes_fetched(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    first = _download(hub, tmp_path / "cache")
    hub.reset_counters()

    second = _download(hub, tmp_path / "cache")

    assert second == first
    assert (hub.bytes_served, hub.file_requests) == (0, 0)


def test_given_served_pipeline_when_model_info_read_then_sha_is_the_commit_and_siblings_are_the_files(
    hub: LoopbackHub, pipeline: Path
) -> None:
    info = HfApi(endpoint=hub.endpoint).model_info(REPO)

    assert info.sha == hub.commit(REPO)
    assert len(info.sha) == 40 and int(info.sha, 16) >= 0
    assert info.siblings is not None
    assert {s.rfilename: s.size for s in info.siblings} == {p: len(b) for p, b in _files(pipeline).items()}
    assert (info.id, info.gated, info.private) == (REPO, False, False)


def test_given_same_folder_when_served_by_two_hubs_then_same_commit_and_a_changed_file_changes_it(
    pipeline: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    for path, data in _files(pipeline).items():
        (copy / path).parent.mkdir(parents=True, exist_ok=True)
        (copy / path).write_bytes(data)

    same = LoopbackHub({REPO: copy}).commit(REPO)
    (copy / "model_index.json").write_bytes(b"{}")
    changed = LoopbackHub({REPO: copy}).commit(REPO)

    assert same == LoopbackHub({REPO: pipeline}).commit(REPO)
    assert changed != same


def test_given_main_and_the_commit_when_resolved_then_both_name_the_same_commit_and_bytes(
    hub: LoopbackHub, pipeline: Path, tmp_path: Path
) -> None:
    api = HfApi(endpoint=hub.endpoint)
    commit = hub.commit(REPO)

    by_branch = hf_hub_download(
        REPO, "unet/config.json", revision="main", cache_dir=tmp_path, endpoint=hub.endpoint
    )
    by_commit = _download(hub, tmp_path / "by-commit", revision=commit)

    assert api.model_info(REPO, revision="main").sha == commit
    assert api.model_info(REPO, revision=commit).sha == commit
    assert Path(by_branch).read_bytes() == (pipeline / "unet" / "config.json").read_bytes()
    assert Path(by_branch).parent.parent.name == commit
    assert _files(by_commit) == _files(pipeline)


def test_given_unknown_revision_when_downloaded_then_revision_not_found(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    with pytest.raises(RevisionNotFoundError):
        _download(hub, tmp_path, revision="v2")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            REPO, "model_index.json", revision="0" * 40, cache_dir=tmp_path, endpoint=hub.endpoint
        )
    with pytest.raises(RevisionNotFoundError):
        HfApi(endpoint=hub.endpoint).model_info(REPO, revision="refs/pr/1")
    assert hub.bytes_served == 0


def test_given_unknown_repo_when_read_then_repository_not_found(hub: LoopbackHub, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint).model_info("loraflow/absent")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, tmp_path, repo="loraflow/absent")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("loraflow/absent", "model_index.json", cache_dir=tmp_path, endpoint=hub.endpoint)


def test_given_served_repo_when_missing_file_requested_then_entry_not_found(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "unet/absent.bin", cache_dir=tmp_path, endpoint=hub.endpoint)


def test_given_gated_repo_when_downloaded_without_or_with_a_wrong_token_then_gated_repo_error(
    hub: LoopbackHub, tmp_path: Path
) -> None:
    info = HfApi(endpoint=hub.endpoint).model_info(GATED, token=False)  # metadata stays public, as on the Hub

    with pytest.raises(GatedRepoError):
        _download(hub, tmp_path / "none", repo=GATED, token=False)
    with pytest.raises(GatedRepoError):
        hf_hub_download(
            GATED, "model_index.json", cache_dir=tmp_path / "wrong", endpoint=hub.endpoint, token="hf_x"
        )
    assert info.gated == "manual"
    assert hub.bytes_served == 0


def test_given_gated_repo_when_downloaded_with_the_token_then_files_equal(
    hub: LoopbackHub, pipeline: Path, tmp_path: Path
) -> None:
    folder = _download(hub, tmp_path, repo=GATED, token=TOKEN)

    assert _files(folder) == _files(pipeline)
    assert folder.name == hub.commit(GATED)


def test_given_a_file_when_head_and_range_requested_then_hub_headers_and_only_the_span_served(
    hub: LoopbackHub, pipeline: Path
) -> None:
    url = f"{hub.endpoint}/{REPO}/resolve/main/unet/diffusion_pytorch_model.safetensors"
    data = (pipeline / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as head:
        headers = dict(head.headers)
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-"})) as part:
        status, body, content_range = part.status, part.read(), part.headers["Content-Range"]

    assert headers["X-Repo-Commit"] == hub.commit(REPO)
    assert headers["Content-Length"] == str(len(data))
    assert headers["ETag"].strip('"')
    assert not [name for name in headers if name.lower().startswith("x-xet")]  # clients stay on plain HTTP
    assert (status, body, content_range) == (206, data[10:], f"bytes 10-{len(data) - 1}/{len(data)}")
    assert (hub.bytes_served, hub.file_requests) == (len(data) - 10, 1)


@pytest.mark.slow  # a child process that imports diffusers and torch
def test_given_hf_endpoint_in_a_child_process_when_diffusers_downloads_then_from_pretrained_loads_it(
    hub: LoopbackHub, pipeline: Path, tmp_path: Path
) -> None:
    script = (
        "import json, sys\n"
        "from diffusers import DiffusionPipeline\n"
        "folder = DiffusionPipeline.download(sys.argv[1], revision='main')\n"
        "again = DiffusionPipeline.download(sys.argv[1], revision=sys.argv[2])\n"
        "pipe = DiffusionPipeline.from_pretrained(folder)\n"
        "print(json.dumps({'folder': str(folder), 'again': str(again), 'class': type(pipe).__name__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home"))

    done = subprocess.run(
        [sys.executable, "-c", script, REPO, hub.commit(REPO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    folder = Path(result["folder"])
    assert result["class"] == "StableDiffusionPipeline"
    assert folder.is_relative_to(tmp_path / "hf-home") and folder.name == hub.commit(REPO)
    assert Path(result["again"]) == folder  # by commit: the cache answers, so the byte count below holds
    downloaded = _files(folder)
    assert downloaded == {path: data for path, data in _files(pipeline).items() if path in downloaded}
    assert "unet/diffusion_pytorch_model.safetensors" in downloaded
    assert hub.bytes_served == sum(len(data) for data in downloaded.values())
