"""`loraflow generate JOB "prompt" ... [--steps N] [--seed N] [--scale F] [--resolution N] [--negative TEXT]
[--guidance F] [--out DIR] [--json]`: pictures with a COMPLETED job's LoRA, through the public API only.

It asks for them (`POST /jobs/{job_id}/generations`), says each status change of the generation while it
waits, then downloads its pictures into `--out` (default `./generations/<generation_id>/`) and prints their
paths. Exit status: 0 COMPLETED, 1 FAILED or refused by the API (one line), 2 a usage error. With `--json`
the status lines go to stderr and stdout holds the generation's JSON, with `files`: the pictures' paths.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraflow_local.jobs_api import JobsApi, download

POLL_S = 1.0
DEFAULT_OUT = Path("generations")
# Request keys (the API's names) and the options that set them; None: the job's preview setting.
_OPTIONAL_KEYS = ("steps", "seed", "lora_scale", "resolution", "negative_prompt", "guidance")


def add_generate_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    generate = commands.add_parser(
        "generate", parents=parents, help="render prompts with a finished job's LoRA"
    )
    generate.add_argument("job_id", metavar="JOB")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="one picture per prompt")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the job's previews')")
    generate.add_argument("--seed", type=int, help="prompt i renders with seed + i (default: the previews')")
    generate.add_argument(
        "--scale", type=float, dest="lora_scale", metavar="F", help="the LoRA's weight (default 1)"
    )
    generate.add_argument("--resolution", type=int, help="the pictures' side in px (default: the previews')")
    generate.add_argument("--negative", dest="negative_prompt", metavar="TEXT", help="a negative prompt")
    generate.add_argument("--guidance", type=float, metavar="F", help="guidance (default: the model's own)")
    generate.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where the pictures go (default ./generations/<generation_id>/)",
    )


def run_generate(args: argparse.Namespace, api: JobsApi, poll_s: float = POLL_S) -> int:
    as_json = bool(getattr(args, "json", False))
    say: Callable[[str], None] = (lambda line: print(line, file=sys.stderr)) if as_json else print
    body = {"prompts": args.prompts}
    body |= {key: getattr(args, key) for key in _OPTIONAL_KEYS if getattr(args, key) is not None}
    generation = api.generate(args.job_id, body)
    try:
        generation = _wait(api, args.job_id, generation, say, poll_s)
    except KeyboardInterrupt:
        print(
            f"\nstopped waiting; generation {generation['generation_id']} keeps rendering "
            f"(GET /jobs/{args.job_id}/generations/{generation['generation_id']})",
            file=sys.stderr,
        )
        return 130
    files = []
    if generation["status"] == "COMPLETED":
        out: Path = args.out or DEFAULT_OUT / generation["generation_id"]
        files = [
            download(image["url"], out / f"{index:02d}.png")
            for index, image in enumerate(generation["images"])
        ]
    if as_json:
        print(json.dumps({**generation, "files": [str(path) for path in files]}, indent=2))
    else:
        for path in files:
            print(path)
    return 0 if generation["status"] == "COMPLETED" else 1


def _wait(
    api: JobsApi, job_id: str, generation: dict[str, Any], say: Callable[[str], None], poll_s: float
) -> dict[str, Any]:
    """Poll until the generation ends; a line per status."""
    status = None
    while True:
        if generation["status"] != status:
            status = generation["status"]
            say(f"generation {generation['generation_id']}: {status}{_reason(generation)}")
        if status != "PENDING":
            return generation
        time.sleep(poll_s)
        generation = api.generation(job_id, generation["generation_id"])


def _reason(generation: dict[str, Any]) -> str:
    error = generation.get("error")
    return f": {error['code']} {error['message']}" if error else ""
