"""The demo's LoRA, trained by the trainer on the toy world's base from `make demo`'s own dataset and
config, draws its subject (a plus, a shape the base never drew) for captions with its trigger, in colours
and places the dataset never showed, and leaves captions without the trigger as the base draws them.

Read back by `toy_world.judge` over the demo's held-out subject scenes and other scenes, 2 seeds each.
Thresholds from measured runs (bench/results.json's demo_* entries, the same training), with margin.
"""

from __future__ import annotations

import pytest
from diffusion_kit import SageMakerDirs, write_hyperparameters
from loraflow_diffusion.toy_world.base import copy_toy_base, load_toy_base
from loraflow_diffusion.toy_world.evaluate import TriggerRates, trigger_rates
from loraflow_local.sample_dataset import (
    CONFIG_NAME,
    MEASURE_SEEDS,
    NEW_SUBJECT_SCENES,
    OTHER_SCENES,
    TRIGGER,
    write_sample_dataset,
)

pytestmark = pytest.mark.slow  # trains a LoRA and renders

# Measured in two runs (1 and 2 CPU threads): 0.49, 0.50 (a plus in the caption's colour and place too:
# 0.29, 0.30); the base 0.0.
LORA_SUBJECT_MIN = 0.3  # renders showing a plus for captions with the trigger
BASE_SUBJECT_MAX = 0.1  # the base never drew a plus
SUBJECT_WITHOUT_TRIGGER_MAX = 0.1  # captions of the base's scenes drawn as a plus by the LoRA: 0.0, 0.0
FOLLOWING_DROP_MAX = 0.2  # the base's prompt following on them (0.95) minus the LoRA's: 0.08, 0.10


@pytest.fixture(scope="module")
def rates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TriggerRates]:
    from loraflow_training.__main__ import main

    root = tmp_path_factory.mktemp("demo-lora")
    dirs = SageMakerDirs(root, write_sample_dataset(root / "input" / "data"), root / "model", root / "output")
    base = copy_toy_base(root / "base")
    write_hyperparameters(root, CONFIG_NAME, str(base), "demo-learns")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in dirs.env().items():
            monkeypatch.setenv(name, value)
        assert main(["train"]) == 0, dirs.failure
    pipe = load_toy_base()
    pipe.set_progress_bar_config(disable=True)
    measured = {"base": trigger_rates(pipe, TRIGGER, NEW_SUBJECT_SCENES, OTHER_SCENES, MEASURE_SEEDS)}
    pipe.load_lora_weights(dirs.model)
    measured["lora"] = trigger_rates(pipe, TRIGGER, NEW_SUBJECT_SCENES, OTHER_SCENES, MEASURE_SEEDS)
    return measured


def test_given_demo_lora_when_prompted_with_trigger_in_new_colours_and_places_then_draws_its_subject(
    rates: dict[str, TriggerRates],
) -> None:
    lora, base = rates["lora"].with_trigger, rates["base"].with_trigger

    assert lora["shape"] >= LORA_SUBJECT_MIN, lora
    assert base["shape"] <= BASE_SUBJECT_MAX, base


def test_given_demo_lora_when_prompted_without_trigger_then_draws_what_the_base_draws(
    rates: dict[str, TriggerRates],
) -> None:
    lora, base = rates["lora"], rates["base"]

    assert lora.subject_without_trigger <= SUBJECT_WITHOUT_TRIGGER_MAX, lora
    assert base.without_trigger["all"] - lora.without_trigger["all"] <= FOLLOWING_DROP_MAX, (base, lora)
