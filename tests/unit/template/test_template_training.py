"""Training capacity in the template: spot with checkpoints, multi-GPU types, who may touch checkpoints."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import pytest
from loraflow_shared.base_models import MANIFEST_FILE, lease_key, mirror_prefix
from loraflow_shared.jobs.model import checkpoint_prefix, progress_key
from template_helpers import as_list, policy_statements

# Stand-ins for what CloudFormation resolves, so IAM resources become concrete ARNs to match.
PSEUDO = {"AWS::Partition": "aws", "AWS::Region": "us-east-1", "AWS::AccountId": "123456789012"}
BUCKET_NAMES = {"ArtifactsBucket": "artifacts", "DatasetBucket": "datasets"}
JOB_ID = "4f1c2a9e0b7d3c5a6e8f1029"
CHECKPOINT_OBJECT = f"arn:aws:s3:::artifacts/{checkpoint_prefix(JOB_ID)}state/step-100/lora.pt"
PROGRESS_OBJECT = f"arn:aws:s3:::artifacts/{progress_key(JOB_ID)}"
CHECKPOINT_EXPIRY_DAYS = 14
MULTI_GPU_TYPES = {"ml.g5.12xlarge", "ml.g5.48xlarge", "ml.p4d.24xlarge"}


def _resolve(value: Any) -> str:
    """A policy Resource as a concrete ARN (Ref/GetAtt of buckets, Fn::Sub with or without variables)."""
    if isinstance(value, str):
        return value
    if "Ref" in value:
        return BUCKET_NAMES.get(value["Ref"], value["Ref"])
    if "Fn::If" in value:  # a condition's resource: as when the condition holds
        return _resolve(value["Fn::If"][1])
    if "Fn::GetAtt" in value:
        logical_id, attribute = value["Fn::GetAtt"]
        if logical_id in BUCKET_NAMES and attribute == "Arn":
            return f"arn:aws:s3:::{BUCKET_NAMES[logical_id]}"
        return f"{logical_id}.{attribute}"  # not a bucket: matches no S3 ARN
    template, variables = (value["Fn::Sub"], {}) if isinstance(value["Fn::Sub"], str) else value["Fn::Sub"]

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in variables:
            return _resolve(variables[name])
        if name.endswith(".Arn"):
            return _resolve({"Fn::GetAtt": [name.removesuffix(".Arn"), "Arn"]})
        return PSEUDO.get(name) or BUCKET_NAMES.get(name, match.group(0))

    return re.sub(r"\$\{([^}]+)\}", substitute, template)


def _allowed(transformed: dict[str, Any], owner: str, action: str, arn: str) -> bool:
    for logical_id, statement in policy_statements(transformed):
        if logical_id != owner or statement.get("Effect") != "Allow":
            continue
        resources = [_resolve(resource) for resource in as_list(statement["Resource"])]
        if action in as_list(statement["Action"]) and any(fnmatch.fnmatchcase(arn, r) for r in resources):
            return True
    return False


def test_given_training_parameters_when_read_then_spot_by_default_with_bounded_extra_wait(
    template: dict[str, Any],
) -> None:
    parameters = template["Parameters"]
    spot, wait = parameters["UseSpotTraining"], parameters["SpotWaitSeconds"]

    assert (spot["Default"], sorted(spot["AllowedValues"])) == ("true", ["false", "true"])
    assert wait["MinValue"] == 0
    assert wait["MinValue"] <= wait["Default"] <= wait["MaxValue"]


def test_given_longest_possible_job_when_compared_with_checkpoint_expiry_then_checkpoints_outlive_it(
    template: dict[str, Any], transformed: dict[str, Any]
) -> None:
    parameters = template["Parameters"]
    longest_job_s = parameters["MaxTrainingSeconds"]["MaxValue"] + parameters["SpotWaitSeconds"]["MaxValue"]
    rules = transformed["Resources"]["ArtifactsBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    (expiry,) = [r for r in rules if r.get("Prefix") == "checkpoints/" and r["Status"] == "Enabled"]

    assert expiry["ExpirationInDays"] == CHECKPOINT_EXPIRY_DAYS
    assert longest_job_s < CHECKPOINT_EXPIRY_DAYS * 86400


def test_given_training_instance_types_when_listed_then_multi_gpu_types_are_offered(
    template: dict[str, Any],
) -> None:
    instance_type = template["Parameters"]["TrainingInstanceType"]

    assert set(instance_type["AllowedValues"]) >= MULTI_GPU_TYPES
    assert instance_type["Default"] in instance_type["AllowedValues"]
    assert all(value.startswith("ml.") for value in instance_type["AllowedValues"])


@pytest.mark.parametrize("action", ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"])
def test_given_sagemaker_role_when_syncing_checkpoints_then_it_may_read_write_and_delete_them(
    transformed: dict[str, Any], action: str
) -> None:
    # SageMaker restores the prefix, uploads new files and deletes what the trainer deleted.
    assert _allowed(transformed, "SageMakerExecutionRole", action, CHECKPOINT_OBJECT)
    assert _allowed(transformed, "SageMakerExecutionRole", "s3:ListBucket", "arn:aws:s3:::artifacts")


REPO, COMMIT = "owner/model", "0" * 40


def test_given_sagemaker_role_when_deleting_then_only_checkpoints(transformed: dict[str, Any]) -> None:
    published_lora = f"arn:aws:s3:::artifacts/jobs/{JOB_ID}/lora/pytorch_lora_weights.safetensors"

    assert not _allowed(transformed, "SageMakerExecutionRole", "s3:DeleteObject", published_lora)
    assert not _allowed(
        transformed, "SageMakerExecutionRole", "s3:DeleteObject", "arn:aws:s3:::datasets/x.png"
    )
    # A trainer releases the mirror lease it held, and never deletes a published mirror.
    lease = f"arn:aws:s3:::artifacts/{lease_key(REPO, COMMIT)}"
    mirror_file = f"arn:aws:s3:::artifacts/{mirror_prefix(REPO, COMMIT)}{MANIFEST_FILE}"
    assert _allowed(transformed, "SageMakerExecutionRole", "s3:DeleteObject", lease)
    assert _allowed(transformed, "SageMakerExecutionRole", "s3:PutObject", mirror_file)
    assert not _allowed(transformed, "SageMakerExecutionRole", "s3:DeleteObject", mirror_file)


def test_given_jobs_api_role_when_reading_progress_then_allowed_but_never_writing(
    transformed: dict[str, Any],
) -> None:
    assert _allowed(transformed, "JobsApiFunctionRole", "s3:GetObject", PROGRESS_OBJECT)
    # Without ListBucket a missing progress.json reads as AccessDenied instead of NoSuchKey.
    assert _allowed(transformed, "JobsApiFunctionRole", "s3:ListBucket", "arn:aws:s3:::artifacts")
    assert not _allowed(transformed, "JobsApiFunctionRole", "s3:PutObject", PROGRESS_OBJECT)


def test_given_resolver_when_policy_does_not_cover_the_object_then_not_allowed(
    transformed: dict[str, Any],
) -> None:
    # The matcher must be able to say no: the ingest function reads datasets, not artifacts.
    assert _allowed(transformed, "IngestDatasetFunctionRole", "s3:GetObject", "arn:aws:s3:::datasets/a/b.png")
    assert not _allowed(transformed, "IngestDatasetFunctionRole", "s3:GetObject", PROGRESS_OBJECT)
