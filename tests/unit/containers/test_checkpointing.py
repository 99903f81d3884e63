"""Training-state checkpoints: atomic saves, newest two kept, damaged ones skipped, foreign ones refused."""

from __future__ import annotations

import json
import random
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loraflow_shared.dataset.config import LoraflowSettings, TrainingConfig
from loraflow_shared.errors import ErrorCode
from loraflow_training.checkpointing import (
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointIdentity,
    CheckpointMismatch,
    CheckpointStore,
    global_rng_state,
    restore_global_rng,
)

pytestmark = pytest.mark.slow  # builds, trains or renders tiny diffusion models

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def training_state(step: int) -> dict[str, Any]:
    """A state shaped like the trainer's: LoRA weights, an optimizer's and a schedule's state dicts."""
    generator = torch.Generator().manual_seed(step)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(2, 4, generator=generator)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return {
        "lora": {"unet.up.weight": torch.randn(3, 2, generator=generator)},
        "optimizer": optimizer.state_dict(),
        "lr_schedule": schedule.state_dict(),
        "noise_generator": generator.get_state(),
        "batches_drawn": step * 2,
        "fingerprint": f"run-{step}",
    }


def identity(network_dim: int = 16, targets: list[str] = TARGETS) -> CheckpointIdentity:
    return CheckpointIdentity.for_run(TrainingConfig(network_dim=network_dim), "tiny-sd", targets)


def assert_same_state(loaded: dict[str, Any], saved: dict[str, Any]) -> None:
    assert loaded.keys() == saved.keys()
    torch.testing.assert_close(loaded["lora"], saved["lora"])
    torch.testing.assert_close(loaded["optimizer"], saved["optimizer"])
    assert loaded["lr_schedule"] == saved["lr_schedule"]
    assert torch.equal(loaded["noise_generator"], saved["noise_generator"])
    assert (loaded["batches_drawn"], loaded["fingerprint"]) == (saved["batches_drawn"], saved["fingerprint"])


def test_given_empty_or_missing_folder_when_latest_then_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "missing").latest() is None
    assert CheckpointStore(tmp_path).latest() is None


def test_given_saved_state_when_latest_then_same_step_and_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state")
    saved = training_state(100)

    folder = store.save(100, saved)
    latest = store.latest()

    assert folder == tmp_path / "state" / "step-00000100"
    assert {path.name for path in folder.iterdir()} == {STATE_FILE, MANIFEST_FILE}
    assert latest is not None and latest[0] == 100
    assert_same_state(latest[1], saved)


def test_given_resumed_optimizer_state_when_stepped_then_same_as_uninterrupted(tmp_path: Path) -> None:
    """The round trip is good enough to resume: the next optimizer step is bit-identical."""

    def fresh() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-2)

    def step(layer: torch.nn.Linear, optimizer: torch.optim.AdamW) -> None:
        layer(torch.ones(1, 4)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    layer, optimizer = fresh()
    step(layer, optimizer)
    CheckpointStore(tmp_path).save(1, {"weights": layer.state_dict(), "optimizer": optimizer.state_dict()})
    step(layer, optimizer)
    resumed_layer, resumed_optimizer = fresh()
    latest = CheckpointStore(tmp_path).latest()
    assert latest is not None
    resumed_layer.load_state_dict(latest[1]["weights"])
    resumed_optimizer.load_state_dict(latest[1]["optimizer"])
    step(resumed_layer, resumed_optimizer)

    torch.testing.assert_close(resumed_layer.state_dict(), layer.state_dict(), rtol=0, atol=0)


def test_given_several_saves_when_listed_then_only_the_newest_two_remain(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)

    for step in (100, 200, 300, 400):
        store.save(step, training_state(step))

    assert [step for step, _ in store.checkpoints()] == [300, 400]
    latest = store.latest()
    assert latest is not None and latest[0] == 400


def test_given_crash_mid_save_when_latest_then_partial_folder_ignored_and_removed_by_next_save(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(100, training_state(100))
    # What a process killed while writing step 200 leaves behind: a partial folder, state cut short.
    partial = tmp_path / ".partial-00000200-k1ll3d"
    partial.mkdir()
    (partial / STATE_FILE).write_bytes(b"PK\x03\x04 half a zip")

    latest = store.latest()
    store.save(200, training_state(200))

    assert latest is not None and latest[0] == 100
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step-00000100", "step-00000200"]


def test_given_newest_checkpoint_truncated_when_latest_then_falls_back_to_the_previous(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(100, training_state(100))
    newest = store.save(200, training_state(200))
    state_file = newest / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])  # a copy cut short (e.g. an interrupted S3 sync)

    latest = store.latest()

    assert latest is not None and latest[0] == 100


def test_given_newest_checkpoint_without_manifest_or_garbled_when_latest_then_skipped(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(100, training_state(100))
    no_manifest = store.save(200, training_state(200))
    (no_manifest / MANIFEST_FILE).unlink()
    garbled = tmp_path / "step-00000300"
    garbled.mkdir()
    (garbled / MANIFEST_FILE).write_text(
        json.dumps({"format": 1, "step": 300, "state_bytes": 12, "saved_at": "x"})
    )
    (garbled / STATE_FILE).write_bytes(b"not a zip...")

    latest = store.latest()

    assert latest is not None and latest[0] == 100


def test_given_same_step_saved_again_when_latest_then_the_new_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(100, training_state(100))

    store.save(100, {**training_state(100), "batches_drawn": 7})
    latest = store.latest()

    assert latest is not None and latest[1]["batches_drawn"] == 7
    assert [step for step, _ in store.checkpoints()] == [100]


def test_given_later_checkpoints_when_an_earlier_step_is_saved_then_they_are_dropped(tmp_path: Path) -> None:
    """A run that resumed from step 100 (step 300 being unusable) must not resume into step 300 again."""
    store = CheckpointStore(tmp_path)
    for step in (100, 300):
        store.save(step, training_state(step))

    store.save(200, training_state(200))

    assert [step for step, _ in store.checkpoints()] == [100, 200]


def test_given_same_identity_when_latest_then_loaded(tmp_path: Path) -> None:
    CheckpointStore(tmp_path, identity=identity()).save(100, training_state(100))

    latest = CheckpointStore(tmp_path, identity=identity()).latest()

    assert latest is not None and latest[0] == 100


def test_given_other_rank_and_targets_when_latest_then_refused_naming_the_differences(tmp_path: Path) -> None:
    CheckpointStore(tmp_path, identity=identity(network_dim=16)).save(100, training_state(100))

    with pytest.raises(CheckpointMismatch) as refused:
        CheckpointStore(tmp_path, identity=identity(network_dim=32, targets=["to_q", "to_v"])).latest()

    assert refused.value.code == ErrorCode.TRAINING_FAILED
    message = refused.value.message
    assert "step 100" in message and "network_dim 16 there, 32 in this run" in message
    assert "target_modules" in message and "config_hash" in message


def test_given_checkpoint_without_identity_when_store_has_one_then_refused(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).save(100, training_state(100))

    with pytest.raises(CheckpointMismatch, match="records no LoRA identity"):
        CheckpointStore(tmp_path, identity=identity()).latest()


def test_given_preview_settings_changed_when_identity_compared_then_still_the_same_run() -> None:
    base = TrainingConfig(network_dim=8)
    previews_changed = TrainingConfig(network_dim=8, loraflow=LoraflowSettings(preview_steps=5))
    rate_changed = TrainingConfig(network_dim=8, learning_rate=1e-3)

    def of(config: TrainingConfig) -> CheckpointIdentity:
        return CheckpointIdentity.for_run(config, "m", TARGETS)

    assert of(previews_changed) == of(base)
    assert of(rate_changed) != of(base)


@pytest.mark.parametrize("value", [np.float64(1.5), defaultdict(int), frozenset({1}), object()])
def test_given_value_a_weights_only_load_refuses_when_saved_then_type_error_and_nothing_written(
    tmp_path: Path, value: object
) -> None:
    store = CheckpointStore(tmp_path)

    with pytest.raises(TypeError, match="^" + re.escape("state['optimizer']['lr'] is a ")):
        store.save(100, {"optimizer": {"lr": value}})

    assert list(tmp_path.iterdir()) == []


def test_given_every_allowed_type_when_saved_then_loaded_back_with_weights_only(tmp_path: Path) -> None:
    state: dict[str, Any] = {
        "ordered": OrderedDict(a=torch.ones(2)),
        "parameter": torch.nn.Parameter(torch.zeros(1)),
        "misc": [
            True,
            3,
            2.5,
            1 + 2j,
            "s",
            b"b",
            None,
            torch.Size([2, 3]),
            torch.bfloat16,
            torch.device("cpu"),
        ],
        "collections": ({1, 2}, (4, 5)),
    }
    store = CheckpointStore(tmp_path)
    store.save(1, state)

    latest = store.latest()

    assert latest is not None
    assert latest[1]["misc"] == state["misc"] and latest[1]["collections"] == state["collections"]
    assert torch.equal(latest[1]["ordered"]["a"], torch.ones(2))


def test_given_global_rng_state_saved_when_restored_then_same_draws_follow(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    store = CheckpointStore(tmp_path)
    store.save(5, {"random": global_rng_state()})
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)

    latest = store.latest()
    assert latest is not None
    restore_global_rng(latest[1]["random"])
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))

    assert again[:3] == expected[:3] and torch.equal(again[3], expected[3])
