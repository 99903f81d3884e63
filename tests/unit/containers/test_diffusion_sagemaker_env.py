from __future__ import annotations

import json
from pathlib import Path

import pytest
from loraflow_diffusion.sagemaker_env import TrainingPaths


def test_given_no_overrides_when_read_then_sagemaker_defaults() -> None:
    paths = TrainingPaths.from_env({})

    assert paths.hyperparameters_file == Path("/opt/ml/input/config/hyperparameters.json")
    assert paths.channel("dataset") == Path("/opt/ml/input/data/dataset")
    assert paths.model_dir == Path("/opt/ml/model")
    assert paths.failure_file == Path("/opt/ml/output/failure")
    assert paths.output_data_dir == Path("/opt/ml/output/data")
    assert paths.checkpoint_dir == Path("/opt/ml/checkpoints")


def test_given_sm_variables_when_read_then_they_win(tmp_path: Path) -> None:
    env = {
        "SM_INPUT_DIR": str(tmp_path / "in"),
        "SM_CHANNEL_DATASET": str(tmp_path / "ds"),
        "SM_MODEL_DIR": str(tmp_path / "model"),
        "SM_OUTPUT_DIR": str(tmp_path / "out"),
    }

    paths = TrainingPaths.from_env(env)

    assert paths.input_config_dir == tmp_path / "in" / "config"
    assert paths.channel("dataset") == tmp_path / "ds"
    assert paths.channel("other") == tmp_path / "in" / "data" / "other"
    assert paths.failure_file == tmp_path / "out" / "failure"
    assert paths.output_data_dir == tmp_path / "out" / "data"


def test_given_hyperparameters_file_when_read_then_json_object(tmp_path: Path) -> None:
    paths = TrainingPaths.from_env({"SM_INPUT_CONFIG_DIR": str(tmp_path)})
    assert paths.read_hyperparameters() == {}

    (tmp_path / "hyperparameters.json").write_text(json.dumps({"job_id": "j"}))
    assert paths.read_hyperparameters() == {"job_id": "j"}

    (tmp_path / "hyperparameters.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        paths.read_hyperparameters()
