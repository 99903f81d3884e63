"""A stand-in training entrypoint for the runner's contract tests: SageMaker layout in, artifacts out.

The `mode` hyperparameter picks the outcome: succeed, fail (writes the failure file), sleep (runs past
MaxRuntimeInSeconds), crash (exits 3 without a failure file).
"""

import json
import os
import sys
import time
from pathlib import Path

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
channel = Path(os.environ["SM_CHANNEL_DATASET"])
seen = {
    "files": sorted(p.relative_to(channel).as_posix() for p in channel.rglob("*") if p.is_file()),
    "env": {key: value for key, value in os.environ.items() if key.startswith(("SM_", "TRAINING_JOB_NAME"))},
    "config": {name: json.loads((config_dir / name).read_text()) for name in sorted(os.listdir(config_dir))},
}
(Path(os.environ["SM_OUTPUT_DATA_DIR"]) / "seen.json").write_text(json.dumps(seen))
(Path(os.environ["SM_MODEL_DIR"]) / "weights.txt").write_text("trained on " + ",".join(seen["files"]))
print("step=1 loss=0.5", flush=True)
