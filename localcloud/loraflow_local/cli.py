"""The `loraflow` command.

loraflow local up --state-dir DIR [--fresh] [--aws-port N] [--api-port N] [--settle-seconds S]
                  [--save-interval S] [--parameter K=V ...]
loraflow validate PATH          # a dataset folder on disk, with the same rules as an upload
loraflow demo [--output DIR]    # the whole pipeline on a generated dataset
loraflow models (--stack NAME | --state-dir DIR) list | pull MODEL | delete MODEL[@COMMIT]
loraflow train | jobs | show | cancel | retry | download | generate | doctor | use   # see client_commands
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow_local.client_commands import COMMANDS as CLIENT_COMMANDS
from loraflow_local.client_commands import add_client_parsers, run_client_command
from loraflow_local.intrinsics import TemplateError
from loraflow_local.local_validation import print_report, validate_folder
from loraflow_local.models_cli import add_models_parser, run_models
from loraflow_local.persistence import DEFAULT_SAVE_INTERVAL_S, PortInUseError

if TYPE_CHECKING:
    from loraflow_local.cloud import LocalCloud


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "local":
        return _local_up(args)
    if args.command == "validate":
        return _validate(Path(args.path))
    if args.command == "models":
        return run_models(args)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args)
    from loraflow_local.demo import run_demo  # imported late: it pulls in the whole local cloud

    return run_demo(Path(args.output), Path(args.state_dir) if args.state_dir else None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="the embedded local cloud")
    local_commands = local.add_subparsers(dest="action", required=True)
    up = local_commands.add_parser("up", help="run template.yaml locally until Ctrl-C")
    up.add_argument(
        "--state-dir",
        required=True,
        help="where the saved state, endpoints.json, logs and job folders go; a restart here keeps the state",
    )
    up.add_argument(
        "--fresh", action="store_true", help="discard the state saved in --state-dir, start empty"
    )
    up.add_argument(
        "--aws-port", type=int, default=0, help="moto's port (default: the last run's if free, else any)"
    )
    up.add_argument(
        "--api-port",
        type=int,
        default=0,
        help="the REST API's port (default: the last run's if free, else any)",
    )
    up.add_argument(
        "--save-interval",
        type=float,
        default=DEFAULT_SAVE_INTERVAL_S,
        metavar="SECONDS",
        help="save the state this often while running, as well as on stop (0: only on stop)",
    )
    up.add_argument("--settle-seconds", type=int, help="override the SettleSeconds parameter (default 3)")
    up.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a template parameter (repeatable)",
    )
    up.add_argument(
        "--template", type=Path, help="the SAM template (default: the repository's template.yaml)"
    )
    validate = commands.add_parser("validate", help="check a dataset folder with the upload rules")
    validate.add_argument("path", help="the dataset folder, e.g. ./mydata/0001-dataset")
    demo = commands.add_parser("demo", help="run the whole pipeline on a generated sample dataset")
    demo.add_argument("--output", default="demo-output", help="where the LoRA, previews and job JSON go")
    demo.add_argument(
        "--state-dir",
        help="keep the local cloud's files here (each demo starts empty; default: a temporary folder)",
    )
    add_models_parser(commands)
    add_client_parsers(commands)
    return parser


def _local_up(args: argparse.Namespace) -> int:
    # Imported late: moto and the template stack are slow to load.
    from loraflow_local.cloud import LocalCloud

    overrides = dict(_key_value(item) for item in args.parameter)
    if args.settle_seconds is not None:
        overrides["SettleSeconds"] = str(args.settle_seconds)
    cloud = LocalCloud(
        args.state_dir,
        aws_port=args.aws_port,
        api_port=args.api_port,
        parameter_overrides=overrides,
        fresh=args.fresh,
        save_interval_s=args.save_interval,
        **({"template_path": args.template} if args.template else {}),
    )
    stop = threading.Event()
    # Installed before the start: a SIGTERM sent once endpoints.json appears still stops cleanly (and saves).
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        return _serve(cloud, stop, Path(args.state_dir) / "endpoints.json")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve(cloud: LocalCloud, stop: threading.Event, location: Path) -> int:
    try:
        endpoints = cloud.start()
    except TemplateError as error:
        print(f"loraflow: the template cannot run locally: {error}", file=sys.stderr)
        return 2
    except PortInUseError as error:
        print(f"loraflow: {error}", file=sys.stderr)
        return 2
    try:
        # stdout is the functions' log stream (CloudWatch's role); the summary goes to stderr.
        summary = "\n".join(f"  {key}: {value}" for key, value in endpoints.items())
        restored = (
            f"restored the state saved at {cloud.restored.saved_at}; " if cloud.restored.restored else ""
        )
        print(
            f"local cloud running ({restored}Ctrl-C saves the state and stops it); {location}:\n{summary}",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
        print("stopping: interrupting training jobs, saving the state...", file=sys.stderr, flush=True)
    finally:
        cloud.stop()
    return 0


def _key_value(item: str) -> tuple[str, str]:
    key, separator, value = item.partition("=")
    if not separator or not key:
        raise SystemExit(f"loraflow: --parameter expects KEY=VALUE, got {item!r}")
    return key, value


def _validate(path: Path) -> int:
    if not path.is_dir():
        print(f"loraflow: {path} is not a folder", file=sys.stderr)
        return 2
    report = validate_folder(path)
    print_report(report)
    return 0 if report.accepted else 1


if __name__ == "__main__":
    sys.exit(main())
