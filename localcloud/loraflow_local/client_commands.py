"""The user's commands against a running loraflow (a local cloud or a deployed stack), through the public
API and the dataset bucket only:

loraflow train DIR [--dataset NAME] [--wait] [--download OUT]
loraflow jobs [--dataset NAME] [--json]      loraflow show JOB [--json]
loraflow cancel JOB                        loraflow retry JOB
loraflow download JOB OUT                  loraflow doctor
loraflow generate JOB PROMPT... [--steps N] [--seed N] [--scale F] [--out DIR] [--json]   # generate_command
loraflow use (--local [DIR] | --stack NAME [--region R])   # the default target, saved once

Each takes `--local [STATE_DIR]` or `--stack NAME [--region R]`; without them the default target
(`loraflow_local.targets`). Exit status: 0 done (`train --wait`: COMPLETED), 1 a job that ended
REJECTED/FAILED/CANCELLED or an error said in one line, 2 a usage error; Ctrl-C while following leaves the
job running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from loraflow_local.follow import FollowTimedOut, follow_job
from loraflow_local.generate_command import add_generate_parser, run_generate
from loraflow_local.job_files import save_job_files
from loraflow_local.jobs_api import ApiError, JobsApi
from loraflow_local.local_validation import print_report, validate_folder
from loraflow_local.targets import Endpoints, TargetError, choose_target, resolve, save_target
from loraflow_local.uploader import upload_dataset

COMMANDS = ("train", "jobs", "show", "cancel", "retry", "download", "generate", "doctor", "use")
JOB_APPEARS_S = 300.0  # the upload Lambda waits for the upload to settle before it creates the job


class CommandError(Exception):
    """Said to the user as one line, exit status 1."""


def add_client_parsers(commands: Any) -> None:
    target = argparse.ArgumentParser(add_help=False)
    where = target.add_mutually_exclusive_group()
    where.add_argument(
        "--local", nargs="?", const="", metavar="STATE_DIR", help="a local cloud (default .localcloud)"
    )
    where.add_argument("--stack", metavar="NAME", help="a deployed stack (your AWS credentials)")
    target.add_argument("--region", help="the stack's region (default: your AWS configuration's)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON, for scripts")

    train = commands.add_parser("train", parents=[target], help="validate, upload and train a dataset folder")
    train.add_argument(
        "folder", type=Path, help="the dataset folder (a .toml and <repeats>_<trigger> folders)"
    )
    train.add_argument("--dataset", help="the dataset's name in the bucket (default: the folder's name)")
    train.add_argument("--wait", action="store_true", help="follow the job until it ends")
    train.add_argument("--download", type=Path, metavar="OUT", help="with --wait: fetch the job's files here")
    train.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="with --wait: stop following after this long, exit 1 (the job keeps running)",
    )
    jobs = commands.add_parser("jobs", parents=[target, as_json], help="the latest jobs, newest first")
    jobs.add_argument("--dataset", help="only this dataset's jobs")
    for name, text in (("show", "one job"), ("cancel", "stop a job"), ("retry", "run an ended job again")):
        command = commands.add_parser(
            name, parents=[target, *([as_json] if name == "show" else [])], help=text
        )
        command.add_argument("job_id", metavar="JOB")
    download = commands.add_parser("download", parents=[target], help="fetch a job's LoRA files and previews")
    download.add_argument("job_id", metavar="JOB")
    download.add_argument("output", type=Path, metavar="OUT")
    add_generate_parser(commands, [target, as_json])
    commands.add_parser("doctor", parents=[target], help="which target is in use, and whether it answers")
    commands.add_parser("use", parents=[target], help="save --local/--stack as the default target")


def run_client_command(args: argparse.Namespace) -> int:
    try:
        target = choose_target(args.local, args.stack, args.region)
        if args.command == "use":
            print(f"default target {target.spec} saved in {save_target(target)}")
            return 0
        if args.command == "doctor":
            return _doctor(args)
        return _COMMANDS[args.command](args, resolve(target))
    except (CommandError, TargetError, ApiError, FollowTimedOut) as error:
        print(f"loraflow {args.command}: {error}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as error:
        print(f"loraflow {args.command}: AWS said: {error}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:  # a presigned download that failed (HTTPError is one too)
        print(f"loraflow {args.command}: a download failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped following; the job keeps running (`loraflow cancel JOB` stops it)", file=sys.stderr)
        return 130


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _api(endpoints: Endpoints) -> JobsApi:
    return JobsApi(endpoints.api_url, endpoints.api_key)


def _train(args: argparse.Namespace, endpoints: Endpoints) -> int:
    folder: Path = args.folder
    if not folder.is_dir():
        raise CommandError(f"{folder} is not a folder")
    dataset = args.dataset or folder.resolve().name
    if "/" in dataset or not dataset.strip():
        raise CommandError(f"dataset name {dataset!r} must be one non-empty path segment")
    report = validate_folder(folder, dataset)
    print_report(report)
    if not report.accepted:
        return 1  # never uploaded: the upload would be rejected with this same report
    api = _api(endpoints)
    before = {job["job_id"]: job for job in api.jobs(dataset)}
    s3 = endpoints.client("s3")
    result = upload_dataset(s3, folder.resolve(), endpoints.dataset_bucket, dataset)
    print(
        f"uploaded {len(result.uploaded)} files ({result.uploaded_bytes} bytes), {len(result.skipped)} "
        f"already there, {len(result.deleted)} removed, to s3://{endpoints.dataset_bucket}/{dataset}/"
    )
    job = _job_for_upload(api, dataset, before, changed=bool(result.uploaded or result.deleted))
    if not args.wait:
        print(f"job {job['job_id']}: {job['status']}; follow it with `loraflow show {job['job_id']}`")
        return 0
    job = follow_job(api, job["job_id"], timeout_s=args.timeout)
    _print_problems(job)
    if args.download is not None and job["status"] == "COMPLETED":
        files = save_job_files(job, args.download)
        print(f"saved {len(files)} files in {args.download}/")
    return 0 if job["status"] == "COMPLETED" else 1


def _job_for_upload(
    api: JobsApi, dataset: str, before: dict[str, dict[str, Any]], changed: bool
) -> dict[str, Any]:
    """The job the upload started; with nothing changed, the dataset's latest job (same content)."""
    if not changed and before:
        latest = max(before.values(), key=lambda job: job["created_at"])
        print(f"nothing changed since job {latest['job_id']}")
        return latest
    deadline = time.monotonic() + JOB_APPEARS_S
    while time.monotonic() < deadline:
        new = [job for job in api.jobs(dataset) if job["job_id"] not in before]
        if new:
            return max(new, key=lambda job: job["created_at"])
        time.sleep(2)
    raise CommandError(f"no job appeared for dataset {dataset} within {JOB_APPEARS_S:.0f} s of the upload")


def _jobs(args: argparse.Namespace, endpoints: Endpoints) -> int:
    items = _api(endpoints).jobs(args.dataset)
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    if not items:
        print("no jobs yet" if args.dataset is None else f"no jobs for dataset {args.dataset}")
    for job in items:
        print(_job_line(job))
    return 0


def _show(args: argparse.Namespace, endpoints: Endpoints) -> int:
    job = _api(endpoints).job(args.job_id)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    print(_job_line(job))
    _print_problems(job)
    if job.get("progress"):
        report = job["progress"]
        print(f"  training: step {report['step']}/{report['total_steps']}, loss {report.get('loss')}")
    for preview in job.get("previews") or []:
        print(f"  preview: {preview['prompt']}")
    return 0


def _cancel(args: argparse.Namespace, endpoints: Endpoints) -> int:
    job = _api(endpoints).cancel(args.job_id)
    print(f"job {args.job_id}: {job.get('status', 'CANCELLED')}")
    return 0


def _retry(args: argparse.Namespace, endpoints: Endpoints) -> int:
    job = _api(endpoints).retry(args.job_id)
    print(f"job {args.job_id}: {job.get('status', 'QUEUED')} (attempt {job.get('attempt', '?')})")
    return 0


def _download(args: argparse.Namespace, endpoints: Endpoints) -> int:
    job = _api(endpoints).job(args.job_id)
    if job["status"] != "COMPLETED":
        raise CommandError(f"job {args.job_id} is {job['status']}: only a COMPLETED job has files")
    files = save_job_files(job, args.output)
    print(f"saved {len(files)} files in {args.output}/")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    target = choose_target(args.local, args.stack, args.region)
    print(f"target: {target.spec}")
    endpoints = resolve(target)
    print(f"api: {endpoints.api_url}")
    _api(endpoints).jobs("loraflow-doctor", limit=1)  # raises ApiError when it does not answer
    print("api: answers, and the API key is accepted")
    endpoints.client("s3").head_bucket(Bucket=endpoints.dataset_bucket)
    print(f"dataset bucket: s3://{endpoints.dataset_bucket}/ is reachable")
    return 0


def _print_problems(job: dict[str, Any]) -> None:
    """Every error and warning of the job, a line each, as `loraflow validate` prints them."""
    for label in ("error", "warning"):
        for problem in job.get(f"{label}s") or []:
            print(f"  {label:7} {problem['code']:20} {problem.get('path') or '.'}: {problem['message']}")


def _job_line(job: dict[str, Any]) -> str:
    cost = job.get("total_estimated_usd")
    price = f" ${cost:.2f}" if cost is not None else ""
    return f"{job['job_id']}  {job['status']:20} {job['dataset']}  {job['created_at']}{price}"


_COMMANDS = {
    "train": _train,
    "jobs": _jobs,
    "show": _show,
    "cancel": _cancel,
    "retry": _retry,
    "download": _download,
    "generate": lambda args, endpoints: run_generate(args, _api(endpoints)),
}
