"""The toy world's base and the demo's LoRA, measured by reading renders back (`toy_world.judge`).

- `toy_base_prompt_following_<field>`: on the captions the fit held out (colour, shape, position
  combinations it never saw), the share of renders that show the named colour / shape / position / all.
- `demo_*_subject_hit_rate_*`: the demo's dataset trained as `make demo` trains it; the share of renders
  showing a trigger's subject (its colour and shape) for prompts with the trigger (the LoRA, and the base
  alone) and for captions of other scenes (the LoRA).
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
from loraflow_diffusion.toy_world.evaluate import hit_rate, prompt_following
from loraflow_diffusion.toy_world.fit import held_out_scenes
from loraflow_local.sample_dataset import CONFIG_NAME, OTHER_SCENES, SUBJECTS, write_sample_dataset

from bench.training import sagemaker_layout

SEEDS = (0, 1)
TRIGGER_PROMPTS = ("{trigger}", "a photo of {trigger}", "a {trigger}", "{trigger} on its own")


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
    base = _hit_rates(pipe)
    pipe.load_lora_weights(root / "job" / "model")
    tuned = _hit_rates(pipe)
    what = (
        f"{len(TRIGGER_PROMPTS)} prompts per subject x {len(SEEDS)} seeds, the demo's dataset and config "
        "trained by the trainer; share of renders read (toy_world.judge) as the trigger's subject "
        "(its colour and shape)"
    )
    return [
        _entry("demo_lora_subject_hit_rate_with_trigger", tuned[True], f"LoRA, with the trigger. {what}"),
        _entry("demo_base_subject_hit_rate_with_trigger", base[True], f"base, with the trigger. {what}"),
        _entry(
            "demo_lora_subject_hit_rate_without_trigger",
            tuned[False],
            f"LoRA, captions of other scenes (no trigger) read as a subject. {what}",
        ),
    ]


def _hit_rates(pipe: Any) -> dict[bool, float]:
    """Mean over the demo's subjects: renders showing the subject, with its trigger and without."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for trigger, (_, subject, _, _) in SUBJECTS.items():
        prompts = [prompt.format(trigger=trigger) for prompt in TRIGGER_PROMPTS]
        rates[True].append(hit_rate(pipe, prompts, subject, SEEDS))
        others = [scene.caption() for scene in OTHER_SCENES]
        rates[False].append(hit_rate(pipe, others, subject, SEEDS))
    return {key: round(sum(values) / len(values), 3) for key, values in rates.items()}


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
