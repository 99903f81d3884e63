from __future__ import annotations

import pytest
from loraflow_api.settings import ApiSettings
from loraflow_callback.settings import CallbackSettings
from loraflow_ingest.settings import IngestSettings
from loraflow_pipeline.settings import PipelineSettings
from loraflow_shared.jobs.preview_timing import MAX_PREVIEW_TIMEOUT_S, MIN_PREVIEW_TIMEOUT_S
from loraflow_shared.settings import EnvSettings, SettingsError

ENV = {
    "JOBS_TABLE": "jobs",
    "NOTIFICATION_TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:notifications",
    "STATE_MACHINE_ARN": "arn:aws:states:us-east-1:123456789012:stateMachine:pipeline",
    "SETTLE_SECONDS": "60",
    "DEFAULT_BASE_MODEL": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "ARTIFACTS_BUCKET": "artifacts",
    "PREVIEW_ENDPOINT_NAME": "preview",
    "LARGE_MODEL_PREVIEW_ENDPOINT_NAME": "preview-large",
    "TRAINING_INSTANCE_TYPE": "ml.g5.2xlarge",
    "LARGE_MODEL_FAMILIES": "true",
    "LARGE_MODEL_TRAINING_INSTANCE_TYPE": "ml.g6e.2xlarge",
    "URL_EXPIRY_SECONDS": "3600",
    "PREVIEW_TIMEOUT_SECONDS": "3600",
    "CAPACITY_WAIT_SECONDS": "21600",
    "TRAINING_PRICES_PER_HOUR": "ml.g5.2xlarge=1.515",
    "UPLOAD_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/uploads",
    "HF_TOKEN_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf-token",
}
ALL_SETTINGS: list[type[EnvSettings]] = [IngestSettings, PipelineSettings, CallbackSettings, ApiSettings]


@pytest.mark.parametrize("settings_class", ALL_SETTINGS)
def test_given_complete_environment_when_loaded_then_every_field_read(
    settings_class: type[EnvSettings],
) -> None:
    settings = settings_class.from_environ(ENV)
    for field in settings_class.model_fields:
        assert str(getattr(settings, field)) == ENV[field.upper()]


@pytest.mark.parametrize("settings_class", ALL_SETTINGS)
def test_given_missing_jobs_table_when_loaded_then_error_names_the_variable(
    settings_class: type[EnvSettings],
) -> None:
    environ = {name: value for name, value in ENV.items() if name != "JOBS_TABLE"}
    with pytest.raises(SettingsError, match="JOBS_TABLE"):
        settings_class.from_environ(environ)


@pytest.mark.parametrize(("name", "value"), [("SETTLE_SECONDS", "soon"), ("SETTLE_SECONDS", "-1")])
def test_given_malformed_number_when_loaded_then_error_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        IngestSettings.from_environ(ENV | {name: value})


@pytest.mark.parametrize("value", [MIN_PREVIEW_TIMEOUT_S - 1, MAX_PREVIEW_TIMEOUT_S + 1])
def test_given_preview_timeout_outside_what_async_inference_fits_when_loaded_then_error(value: int) -> None:
    with pytest.raises(SettingsError, match="PREVIEW_TIMEOUT_SECONDS"):
        PipelineSettings.from_environ(ENV | {"PREVIEW_TIMEOUT_SECONDS": str(value)})


@pytest.mark.parametrize(
    "value", ["g5.2xlarge=1.5", "ml.g5.2xlarge", "ml.g5.2xlarge=cheap", "ml.g5.xlarge=-1"]
)
def test_given_malformed_price_table_when_loaded_then_error_names_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match="TRAINING_PRICES_PER_HOUR"):
        PipelineSettings.from_environ(ENV | {"TRAINING_PRICES_PER_HOUR": value})


def test_given_price_table_when_loaded_then_prices_by_instance_type() -> None:
    settings = PipelineSettings.from_environ(
        ENV | {"TRAINING_PRICES_PER_HOUR": " ml.g5.xlarge=1.408, ,ml.p4d.24xlarge=37.688"}
    )
    assert settings.prices == {"ml.g5.xlarge": 1.408, "ml.p4d.24xlarge": 37.688}
