"""A stand-in training entrypoint for the runner's contract tests: SageMaker layout in, artifacts out.

The `mode` hyperparameter picks the outcome: succeed, fail (writes the failure file), sleep (runs past
MaxRuntimeInSeconds), crash (exits 3 without a failure file), checkpoint (below), checkpoint_on_sigterm
(runs until SIGTERM, then saves `state/step-7/` and exits 1, as the real trainer does), stubborn (ignores
SIGTERM: only SIGKILL ends it).

checkpoint: like a trainer saving state for spot resume. It records what it found in its checkpoint
folder (`found_checkpoints.json` in the output data), writes `progress.json` and `state/step-1/`,
waits for a `release` file in its working directory, then saves `state/step-2/`, drops
`state/step-1/` (keeping the latest only) and rewrites `progress.json`; `checkpoint_then` = "crash"
makes it exit 3 after that instead of finishing.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path


def _save(folder: Path, step: int) -> None:
    (folder / "state" / f"step-{step}").mkdir(parents=True, exist_ok=True)
    (folder / "state" / f"step-{step}" / "lora.pt").write_text(f"weights at step {step}")
    (folder / "progress.json").write_text(json.dumps({"step": step, "total_steps": 2}))


def _checkpoint_and_exit(signum, frame):
    _save(Path(os.environ["SM_CHECKPOINT_DIR"]), 7)
    print("SIGTERM: checkpoint saved at step 7", flush=True)
    sys.exit(1)


config_dir = Path(os.environ["SM_INPUT_CONFIG_DIR"])
hyperparameters = json.loads((config_dir / "hyperparameters.json").read_text())
mode = hyperparameters.get("mode", "succeed")
if mode == "fail":
    failure = {
        "code": "MODEL_LOAD_FAILED",
        "path": "",
        "message": "cannot load " + hyperparameters["base_model"],
    }
    (Path(os.environ["SM_OUTPUT_DIR"]) / "failure").write_text(json.dumps(failure))
    sys.exit(1)
if mode == "sleep":
    time.sleep(60)
if mode == "crash":
    print("something broke", flush=True)
    sys.exit(3)
if mode == "checkpoint_on_sigterm":
    signal.signal(signal.SIGTERM, _checkpoint_and_exit)
    print("training until SIGTERM", flush=True)
    time.sleep(60)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ignoring SIGTERM", flush=True)
    time.sleep(60)

if mode == "checkpoint":
    checkpoints = Path(os.environ["SM_CHECKPOINT_DIR"])
    found = {
        p.relative_to(checkpoints).as_posix(): p.read_text() for p in checkpoints.rglob("*") if p.is_file()
    }
    (Path(os.environ["SM_OUTPUT_DATA_DIR"]) / "found_checkpoints.json").write_text(json.dumps(found))
    _save(checkpoints, 1)
    deadline = time.monotonic() + 30
    while not Path("release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _save(checkpoints, 2)
    for stale in (checkpoints / "state" / "step-1").iterdir():
        stale.unlink()
    (checkpoints / "state" / "step-1").rmdir()
    if hyperparameters.get("checkpoint_then") == "crash":
        sys.exit(3)
channel = Path(os.environ["SM_CHANNEL_DATASET"])
seen = {
    "files": sorted(p.relative_to(channel).as_posix() for p in channel.rglob("*") if p.is_file()),
    "env": {key: value for key, value in os.environ.items() if key.startswith(("SM_", "TRAINING_JOB_NAME"))},
    "config": {name: json.loads((config_dir / name).read_text()) for name in sorted(os.listdir(config_dir))},
}
(Path(os.environ["SM_OUTPUT_DATA_DIR"]) / "seen.json").write_text(json.dumps(seen))
(Path(os.environ["SM_MODEL_DIR"]) / "weights.txt").write_text("trained on " + ",".join(seen["files"]))
print("step=1 loss=0.5", flush=True)
