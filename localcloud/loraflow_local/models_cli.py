"""`loraflow models list | pull MODEL | delete MODEL[@COMMIT]`: the stack's cached Hub base models.

The stack is a deployed one (`--stack NAME`: its outputs name the bucket and table; your AWS credentials)
or a running local cloud (`--state-dir DIR`: its endpoints.json). `pull` downloads through this machine
(with your `HF_TOKEN` for gated models) and copies to the stack exactly as a job's first use does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from loraflow_shared.base_model_cache import BaseModelCache, BaseModelInUse, CachedModel
from loraflow_shared.base_model_mirror import MirrorStore
from loraflow_shared.base_models import parse_hub_model
from loraflow_shared.hub import HubError, resolve
from loraflow_shared.jobs.repository import JobRepository

PULL_HOLDER = "loraflow-models-pull"
PULL_LEASE_SECONDS = 2 * 3600


class CommandError(Exception):
    """Said to the user as one line, exit status 1."""


@dataclass(frozen=True)
class Stack:
    store: MirrorStore
    cache: BaseModelCache


def add_models_parser(commands: Any) -> None:
    models = commands.add_parser("models", help="the stack's cached Hub base models")
    target = models.add_mutually_exclusive_group(required=True)
    target.add_argument("--stack", help="a deployed stack's name (its outputs name the bucket and table)")
    target.add_argument("--state-dir", help="a running local cloud's state dir (its endpoints.json)")
    models.add_argument("--region", help="the deployed stack's region (default: your AWS configuration's)")
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every cached model, its size and the unfinished jobs pinned to it")
    pull = actions.add_parser("pull", help="cache a Hub model now, before any job needs it")
    pull.add_argument("model", help="owner/name, optionally @branch, tag or commit")
    delete = actions.add_parser("delete", help="delete cached copies no unfinished job is pinned to")
    delete.add_argument("model", help="owner/name (every cached commit) or owner/name@commit")


def run_models(args: argparse.Namespace) -> int:
    try:
        stack = _stack(args)
        if args.action == "list":
            return _list(stack)
        if args.action == "pull":
            return _pull(stack, args.model)
        return _delete(stack, args.model)
    except (CommandError, BaseModelInUse, HubError) as error:
        print(f"loraflow models: {error}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as error:
        print(f"loraflow models: AWS said: {error}", file=sys.stderr)
        return 1


def _stack(args: argparse.Namespace) -> Stack:
    if args.state_dir:
        location = Path(args.state_dir) / "endpoints.json"
        if not location.is_file():
            raise CommandError(f"no local cloud runs in {args.state_dir} ({location} is missing)")
        endpoints = json.loads(location.read_text())
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=endpoints["region"]
        )
        url = endpoints["aws_endpoint_url"]
        s3, dynamodb = session.client("s3", endpoint_url=url), session.resource("dynamodb", endpoint_url=url)
        bucket, table = endpoints["artifacts_bucket"], endpoints["jobs_table"]
    else:
        session = boto3.session.Session(region_name=args.region)
        bucket, table = _stack_outputs(session, args.stack)
        s3, dynamodb = session.client("s3"), session.resource("dynamodb")
    store = MirrorStore(s3, bucket)
    return Stack(store, BaseModelCache(store, JobRepository(dynamodb.Table(table))))


def _stack_outputs(session: Any, name: str) -> tuple[str, str]:
    [stack] = session.client("cloudformation").describe_stacks(StackName=name)["Stacks"]
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    if "ArtifactsBucketName" not in outputs or "JobsTableName" not in outputs:
        raise CommandError(
            f"stack {name} has no ArtifactsBucketName/JobsTableName outputs: not a loraflow stack"
        )
    return outputs["ArtifactsBucketName"], outputs["JobsTableName"]


def _list(stack: Stack) -> int:
    cached = stack.cache.all()
    if not cached:
        print("no cached base models")
        return 0
    print(f"{'MODEL@COMMIT':64} {'SIZE':>9} {'FILES':>5}  {'CACHED AT':25} {'BY':30} IN USE BY")
    for model in cached:
        print(_row(model))
    return 0


def _row(model: CachedModel) -> str:
    m = model.manifest
    size = f"{m.total_bytes / 1e9:.2f} GB"
    return (
        f"{m.repo + '@' + m.commit:64} {size:>9} {len(m.files):>5}  {m.mirrored_at[:25]:25}"
        f" {m.mirrored_by[:30]:30} {', '.join(model.used_by) or '-'}"
    )


def _pull(stack: Stack, reference: str) -> int:
    model = parse_hub_model(reference)
    if model is None:
        raise CommandError(f"{reference!r} is not a Hub model id (owner/name, optionally @revision)")
    commit = resolve(model, os.environ.get("HF_TOKEN"), read_model_index=False).commit
    if stack.cache.cached(model.repo, commit):
        print(f"{model.repo}@{commit} is cached already")
        return 0
    if not stack.store.acquire_lease(model.repo, commit, PULL_HOLDER, PULL_LEASE_SECONDS):
        raise CommandError(
            f"a job is copying {model.repo}@{commit} to the stack right now: it will be cached"
        )
    try:
        manifest = _download_and_upload(stack.store, model.repo, commit, model.revision)
    except BaseException:
        stack.store.release_lease(model.repo, commit, PULL_HOLDER)
        raise
    print(f"cached {model.repo}@{commit}: {len(manifest.files)} files, {manifest.total_bytes / 1e9:.2f} GB")
    return 0


def _download_and_upload(store: MirrorStore, repo: str, commit: str, revision: str | None) -> Any:
    # Imported here: diffusers (and torch) load only for a pull.
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="loraflow-pull-") as cache_dir:
        # The files the pipeline loads (diffusers' own choice: no duplicate .bin, no root checkpoints).
        folder = Path(DiffusionPipeline.download(repo, revision=commit, cache_dir=cache_dir))
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        with tqdm(total=total, unit="B", unit_scale=True, desc="to the stack") as bar:
            return store.upload(folder, repo, commit, revision, PULL_HOLDER, progress=bar.update)


def _delete(stack: Stack, reference: str) -> int:
    model = parse_hub_model(reference)
    if model is None:
        raise CommandError(f"{reference!r} is not a Hub model id (owner/name, optionally @commit)")
    cached = stack.cache.cached(model.repo, model.revision)
    if not cached:
        raise CommandError(f"{reference} is not cached (see `loraflow models list`)")
    for manifest in cached:
        deleted = stack.cache.delete(manifest)
        print(f"deleted {manifest.repo}@{manifest.commit}: {deleted} objects")
    return 0
