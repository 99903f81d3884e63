"""The local cloud's choices for its trainers name real trainer settings, within their bounds."""

from __future__ import annotations

from loraflow_local.cloud import LOCAL_PROGRESS_INTERVAL_S, PROGRESS_INTERVAL_VARIABLE
from loraflow_training.settings import TrainerSettings


def test_given_the_local_progress_interval_when_the_trainer_reads_it_then_its_own_valid_setting() -> None:
    settings = TrainerSettings.model_validate({PROGRESS_INTERVAL_VARIABLE.lower(): LOCAL_PROGRESS_INTERVAL_S})

    assert PROGRESS_INTERVAL_VARIABLE.lower() in TrainerSettings.model_fields
    assert settings.loraflow_progress_interval_s == float(LOCAL_PROGRESS_INTERVAL_S)
