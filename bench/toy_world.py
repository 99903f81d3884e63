"""The toy world's base and the demo's LoRA, measured by reading renders back (`toy_world.judge`).

- `toy_base_prompt_following_<field>`: on the captions the fit held out (colour, shape, position
  combinations it never saw), the share of renders that show the named colour / shape / position / all.
- `demo_*`: the demo's dataset trained as `make demo` trains it (a plus, a shape the base never drew, as
  "dwjz"), then, for the LoRA and the base alone, the share of renders:
  - `subject_hit_rate_with_trigger`: showing a plus, for captions with the trigger in colours and places
    the dataset never showed ("a big green dwjz at the left on white");
  - `subject_as_captioned_with_trigger`: showing the plus in the caption's colour and place too;
  - `subject_hit_rate_without_trigger`: showing a plus, for captions of the base's scenes;
  - `following_without_trigger`: showing what those captions name (colour, shape and position).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from loraflow_diffusion.toy_world.base import copy_toy_base, load_toy_base
from loraflow_diffusion.toy_world.evaluate import TriggerRates, prompt_following, trigger_rates
from loraflow_diffusion.toy_world.fit import held_out_scenes
from loraflow_local.sample_dataset import (
    CONFIG_NAME,
    MEASURE_SEEDS,
    NEW_SUBJECT_SCENES,
    OTHER_SCENES,
    TRIGGER,
    write_sample_dataset,
)

from bench.training import sagemaker_layout

SEEDS = (0, 1)


def run() -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    base = load_toy_base()
    base.set_progress_bar_config(disable=True)
    held_out = held_out_scenes()
    following = prompt_following(base, held_out, SEEDS)
    setting = (
        f"toy-world base, {len(held_out)} held-out captions x {len(SEEDS)} seeds, 20 steps, guidance 7.5"
    )
    entries = [
        _entry(
            f"toy_base_prompt_following_{field}", rate, f"{setting}: renders showing the caption's {named}"
        )
        for field, rate in following.items()
        for named in [field if field != "all" else "colour, shape and position"]
    ]
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-toy-") as folder:
        entries += _demo_lora_entries(Path(folder))
    return entries


def _demo_lora_entries(root: Path) -> list[dict[str, Any]]:
    model = copy_toy_base(root / "base")
    _train_demo_lora(root / "job", model)
    pipe = load_toy_base()
    pipe.set_progress_bar_config(disable=True)
    rates = {"base": demo_rates(pipe)}
    pipe.load_lora_weights(root / "job" / "model")
    rates["lora"] = demo_rates(pipe)
    what = (
        f"the demo's dataset and config trained by the trainer; {len(NEW_SUBJECT_SCENES)} captions with the "
        f"trigger, {len(OTHER_SCENES)} without, x {len(MEASURE_SEEDS)} seeds, read back by toy_world.judge"
    )
    return [
        entry
        for model_name, measured in rates.items()
        for entry in (
            _entry(
                f"demo_{model_name}_subject_hit_rate_with_trigger",
                measured.with_trigger["shape"],
                f"{model_name}: renders showing the plus for captions with the trigger. {what}",
            ),
            _entry(
                f"demo_{model_name}_subject_as_captioned_with_trigger",
                measured.with_trigger["all"],
                f"{model_name}: renders showing the plus in the caption's colour and position. {what}",
            ),
            _entry(
                f"demo_{model_name}_subject_hit_rate_without_trigger",
                measured.subject_without_trigger,
                f"{model_name}: renders showing a plus for captions of the base's scenes. {what}",
            ),
            _entry(
                f"demo_{model_name}_following_without_trigger",
                measured.without_trigger["all"],
                f"{model_name}: renders showing the colour, shape and position of captions of the base's "
                f"scenes. {what}",
            ),
        )
    ]


def demo_rates(pipe: Any) -> TriggerRates:
    return trigger_rates(pipe, TRIGGER, NEW_SUBJECT_SCENES, OTHER_SCENES, MEASURE_SEEDS)


def _train_demo_lora(root: Path, model: Path) -> None:
    dataset = write_sample_dataset(root / "input" / "data")
    config_dir = root / "input" / "config"
    config_dir.mkdir(parents=True)
    hyperparameters = {"config_file": CONFIG_NAME, "base_model": str(model), "job_id": "bench-toy"}
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters), encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SM_", "LORAFLOW_"))}
    env |= sagemaker_layout(root, dataset) | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "loraflow_training", "train"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"training the demo LoRA failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _entry(name: str, value: float, notes: str) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": "share", "target": None, "notes": notes + "; CPU"}
