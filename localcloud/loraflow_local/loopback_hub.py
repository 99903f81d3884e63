"""A Hugging Face Hub on 127.0.0.1 that serves model folders from disk, so code that downloads with
`huggingface_hub` (diffusers' `DiffusionPipeline.download`, `snapshot_download`, `HfApi.model_info`) runs
offline against `HF_ENDPOINT=<endpoint>`. Standard library only: the local cloud must not need torch or
the Hub client to serve.

It answers exactly what `huggingface_hub` 2.x asks, with the headers and error codes it reads:
- `GET /api/models/{repo}[/revision/{rev}]`: the repo info (`sha`, `siblings`, `gated`, ...);
- `GET /api/models/{repo}/tree/{rev}[/{path}]`: the file listing `snapshot_download` caches per commit;
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: the file, with `X-Repo-Commit`, `ETag`, `Content-Length` and
  byte ranges (`http_get` resumes with `Range: bytes=N-`).
Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`) and a
JSON `{"error": ...}` body, which `hf_raise_for_status` turns into the matching exception.
No `X-Xet-*` header and no `xetHash` is ever sent: the client then never takes its Xet download path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_REVISION = "main"
_CHUNK = 1 << 20
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class _File:
    disk: Path
    size: int
    oid: str  # git blob sha1: the ETag (and tree `oid`) the Hub sends for a file kept in git, not LFS


@dataclass(frozen=True)
class _Snapshot:
    commit: str
    files: dict[str, _File]  # repo path ("unet/config.json") -> file, sorted by path
    last_modified: str  # the Hub's timestamp format, which `parse_datetime` reads


class LoopbackHub:
    """Serves each repo's folder as a single-commit model repo; see the module docstring for the API.

    The folders must not change while served: each is hashed once (on `start` or the first `commit`),
    and that listing, with its sizes and ETags, is what the clients cache by.
    """

    def __init__(
        self, repos: Mapping[str, Path], token: str | None = None, gated: Collection[str] = ()
    ) -> None:
        for repo_id, folder in repos.items():
            if not _REPO_ID.fullmatch(repo_id):
                raise ValueError(f"repo id must be 'owner/name': {repo_id!r}")
            if not Path(folder).is_dir():
                raise NotADirectoryError(f"{repo_id}: {folder} is not a folder")
        unknown = set(gated) - set(repos)
        if unknown:
            raise ValueError(f"gated repos that are not served: {sorted(unknown)}")
        if gated and not token:
            raise ValueError("gated repos need a token that unlocks them")
        self._folders = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self._token = token
        self._gated = frozenset(gated)
        self._snapshots: dict[str, _Snapshot] = {}
        self._lock = threading.Lock()  # guards the snapshots and the counters; handlers run in threads
        self._bytes_served = 0
        self._file_requests = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Hash every folder (a bad one fails here, not mid-download), then serve on a free port."""
        if self._server is not None:
            raise RuntimeError("the hub is already serving")
        for repo_id in self._folders:
            self._snapshot(repo_id)
        self._server = _Server(self)
        # A short poll: `stop` waits for the serving loop to notice, and tests stop a hub each.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the hub is not serving: call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def commit(self, repo_id: str) -> str:
        """The repo's only commit: what "main" resolves to and `model_info(...).sha` says."""
        if repo_id not in self._folders:
            raise KeyError(repo_id)
        return self._snapshot(repo_id).commit

    @property
    def bytes_served(self) -> int:
        """Body bytes written by file GETs (`/resolve/`); API answers and HEADs are not counted."""
        with self._lock:
            return self._bytes_served

    @property
    def file_requests(self) -> int:
        """File GETs (`/resolve/`) received, answered with the file or with an error."""
        with self._lock:
            return self._file_requests

    def reset_counters(self) -> None:
        with self._lock:
            self._bytes_served = 0
            self._file_requests = 0

    def _count(self, *, requests: int = 0, sent: int = 0) -> None:
        with self._lock:
            self._file_requests += requests
            self._bytes_served += sent

    def _snapshot(self, repo_id: str) -> _Snapshot:
        with self._lock:
            snapshot = self._snapshots.get(repo_id)
            if snapshot is None:
                snapshot = self._snapshots[repo_id] = _hash_folder(self._folders[repo_id])
            return snapshot

    def _authorized(self, repo_id: str, authorization: str | None) -> bool:
        if repo_id not in self._gated:
            return True  # tokens are only checked for gated repos: a stray HF_TOKEN must not break others
        expected = f"Bearer {self._token}".encode()
        return authorization is not None and hmac.compare_digest(authorization.encode(), expected)


def _hash_folder(folder: Path) -> _Snapshot:
    files: dict[str, _File] = {}
    newest = 0.0
    for disk in sorted(folder.rglob("*")):
        if not disk.is_file():
            continue
        stat = disk.stat()
        blob = hashlib.sha1(b"blob %d\0" % stat.st_size)
        with disk.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                blob.update(chunk)
        files[disk.relative_to(folder).as_posix()] = _File(disk, stat.st_size, blob.hexdigest())
        newest = max(newest, stat.st_mtime)
    files = dict(sorted(files.items()))
    # Paths and bytes alone decide the commit, so the same folder is the same commit on every run.
    commit = hashlib.sha1(b"".join(f"{path}\0{file.oid}\n".encode() for path, file in files.items()))
    stamp = datetime.fromtimestamp(newest, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return _Snapshot(commit.hexdigest(), files, stamp)


class _HubError(Exception):
    """An answer the Hub gives as an error: status, `X-Error-Code`, message (header and JSON body)."""

    def __init__(
        self, status: HTTPStatus, code: str | None, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # snapshot_download opens 8 connections at once; the default backlog of 5 drops some SYNs (1 s retry).
    request_queue_size = 64

    def __init__(self, hub: LoopbackHub) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a stopped hub leaves no kept-alive connection still answering.
    protocol_version = "HTTP/1.0"

    @property
    def hub(self) -> LoopbackHub:
        assert isinstance(self.server, _Server)
        return self.server.hub

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests and the local cloud log what matters; a line per request is noise

    def _dispatch(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        # Split before unquoting: a revision such as "refs/pr/1" arrives as one %2F-quoted segment.
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(f"{parts[2]}/{parts[3]}", parts[4:], parse_qs(url.query), send_body)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), send_body)
            else:
                raise _HubError(HTTPStatus.NOT_FOUND, None, "Not Found")
        except _HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code is not None:
                headers["X-Error-Code"] = error.code
            self._send(error.status, {"error": error.message}, headers, send_body)
        except ConnectionError:
            pass  # the client went away mid-answer; nothing to tell it

    def _repo(self, repo_id: str, revision: str | None) -> _Snapshot:
        if repo_id not in self.hub._folders:
            raise _HubError(HTTPStatus.NOT_FOUND, "RepoNotFound", "Repository not found")
        snapshot = self.hub._snapshot(repo_id)
        if revision not in (None, DEFAULT_REVISION, snapshot.commit):
            raise _HubError(HTTPStatus.NOT_FOUND, "RevisionNotFound", f"Invalid rev id: {revision}")
        return snapshot

    def _api(self, repo_id: str, rest: list[str], query: dict[str, list[str]], send_body: bool) -> None:
        # Like the Hub, a gated repo's metadata (info, file listing) is public; only its files need the token.
        if not rest:
            self._send(HTTPStatus.OK, self._info(repo_id, self._repo(repo_id, None)), {}, send_body)
        elif len(rest) == 2 and rest[0] == "revision":
            self._send(HTTPStatus.OK, self._info(repo_id, self._repo(repo_id, rest[1])), {}, send_body)
        elif len(rest) >= 2 and rest[0] == "tree":
            snapshot = self._repo(repo_id, rest[1])
            recursive = query.get("recursive", ["false"])[-1].lower() in ("1", "true")
            listing = _tree(snapshot, "/".join(rest[2:]).strip("/"), recursive)
            self._send(HTTPStatus.OK, listing, {}, send_body)  # one page: no `Link: rel="next"` header
        else:
            raise _HubError(HTTPStatus.NOT_FOUND, None, "Not Found")

    def _info(self, repo_id: str, snapshot: _Snapshot) -> dict[str, Any]:
        diffusers = "model_index.json" in snapshot.files
        return {
            "_id": snapshot.commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": snapshot.commit,
            "lastModified": snapshot.last_modified,
            "createdAt": snapshot.last_modified,
            "private": False,
            "gated": "manual" if repo_id in self.hub._gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "diffusers" if diffusers else None,
            "tags": ["diffusers"] if diffusers else [],
            "siblings": [
                {"rfilename": path, "size": file.size, "blobId": file.oid}
                for path, file in snapshot.files.items()
            ],
            "usedStorage": sum(file.size for file in snapshot.files.values()),
            "spaces": [],
        }

    def _resolve(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
        if send_body:
            self.hub._count(requests=1)
        if repo_id not in self.hub._folders:
            raise _HubError(HTTPStatus.NOT_FOUND, "RepoNotFound", "Repository not found")
        if not self.hub._authorized(repo_id, self.headers.get("Authorization")):
            # 401 without a token, 403 with a wrong one; either way `GatedRepo` makes the client raise
            # GatedRepoError (not RepositoryNotFoundError), as for a real gated repo.
            status = HTTPStatus.FORBIDDEN if self.headers.get("Authorization") else HTTPStatus.UNAUTHORIZED
            raise _HubError(status, "GatedRepo", f"Access to model {repo_id} is restricted.")
        snapshot = self._repo(repo_id, revision)
        file = snapshot.files.get(path)
        if file is None:
            # With the commit, the client caches that the file does not exist (`.no_exist/`), as with the Hub.
            raise _HubError(
                HTTPStatus.NOT_FOUND, "EntryNotFound", "Entry not found", {"X-Repo-Commit": snapshot.commit}
            )
        start, end = 0, file.size  # [start, end)
        status = HTTPStatus.OK
        headers = {
            "X-Repo-Commit": snapshot.commit,
            "ETag": f'"{file.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        requested = self.headers.get("Range")
        if requested is not None and send_body:
            span = _byte_range(requested, file.size)
            if span is None:
                raise _HubError(
                    HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                    None,
                    "Range Not Satisfiable",
                    {"Content-Range": f"bytes */{file.size}"},
                )
            start, end = span
            status = HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{file.size}"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if not send_body:
            return
        with file.disk.open("rb") as stream:
            stream.seek(start)
            left = end - start
            while left > 0 and (chunk := stream.read(min(_CHUNK, left))):
                self.wfile.write(chunk)
                self.hub._count(sent=len(chunk))
                left -= len(chunk)

    def _send(self, status: HTTPStatus, payload: object, headers: Mapping[str, str], send_body: bool) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _tree(snapshot: _Snapshot, folder: str, recursive: bool) -> list[dict[str, Any]]:
    """The `tree` answer: files and folders under `folder` ("" is the root), as `RepoFile`/`RepoFolder`."""
    prefix = f"{folder}/" if folder else ""
    below = {path: file for path, file in snapshot.files.items() if path.startswith(prefix)}
    if folder and not below:
        raise _HubError(
            HTTPStatus.NOT_FOUND,
            "EntryNotFound",
            f"{folder} does not exist",
            {"X-Repo-Commit": snapshot.commit},
        )
    folders: set[str] = set()
    files: list[str] = []
    for path in below:
        names = path[len(prefix) :].split("/")
        if recursive:
            folders.update(prefix + "/".join(names[:n]) for n in range(1, len(names)))
            files.append(path)
        elif len(names) == 1:
            files.append(path)
        else:
            folders.add(prefix + names[0])
    entries: list[dict[str, Any]] = []
    for path in sorted(folders):
        inner = "".join(f"{p}\0{f.oid}\n" for p, f in below.items() if p.startswith(f"{path}/"))
        oid = hashlib.sha1(inner.encode()).hexdigest()
        entries.append({"type": "directory", "oid": oid, "size": 0, "path": path})
    for path in files:
        entries.append(
            {"type": "file", "oid": snapshot.files[path].oid, "size": snapshot.files[path].size, "path": path}
        )
    return entries


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=` range as [start, end); None when it cannot be satisfied (a multi-range is refused too)."""
    match = _RANGE.fullmatch(header.strip())
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:  # "bytes=-N": the last N bytes
        start, end = max(size - int(match[2]), 0), size
    else:
        start = int(match[1])
        end = min(int(match[2]) + 1, size) if match[2] else size
    return (start, end) if start < end else None
