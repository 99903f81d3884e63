"""Run the benchmarks and merge their entries into the results file."""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import hub_cache, preview_swap, toy_world, training, validation

BENCHMARKS = {
    "hub_cache": hub_cache.run,
    "preview_swap": preview_swap.run,
    "toy_world": toy_world.run,
    "training": training.run,
    "validation": validation.run,
}


def merge_results(existing: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace entries with the same name in place, append new names, keep everything else."""
    by_name = {entry["name"]: entry for entry in new}
    merged = [by_name.pop(entry["name"], entry) for entry in existing]
    return merged + [entry for entry in new if entry["name"] in by_name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these")
    args = parser.parse_args(argv)

    entries: list[dict[str, Any]] = []
    for name in args.only or sorted(BENCHMARKS):
        print(f"running benchmark: {name}", file=sys.stderr)
        entries += BENCHMARKS[name]()
    existing = json.loads(args.output.read_text()) if args.output.exists() else []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merge_results(existing, entries), indent=2) + "\n")
    for entry in entries:
        print(f"{entry['name']}: {entry['value']} {entry['unit']} (target {entry['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
