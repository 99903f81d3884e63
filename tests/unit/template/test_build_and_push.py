"""containers/build_and_push.sh, run against stand-ins for the aws, docker and git CLIs (the AWS boundary)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from template_helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "containers" / "build_and_push.sh"
REGISTRY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"

# Each stand-in logs its arguments; `aws ecr describe-repositories` fails for repositories in
# $MISSING_REPOSITORIES, like the real CLI does for a repository that does not exist, and
# `aws ecr describe-images` reports $PUSHED_MEDIA_TYPE as the pushed manifest's media type.
STAND_IN = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALL_LOG"
case "$(basename "$0") $*" in
  "aws sts get-caller-identity"*) echo 123456789012 ;;
  "aws ecr describe-repositories"*)
    for name in $MISSING_REPOSITORIES; do [[ "$*" == *"--repository-names $name"* ]] && exit 254; done ;;
  "aws ecr describe-images"*) echo "$PUSHED_MEDIA_TYPE" ;;
  "aws ecr get-login-password"*) echo token ;;
  "docker login"*) cat > /dev/null ;;  # reads the password from stdin, as docker does
  "git rev-parse --short HEAD") echo abc1234 ;;
  "git status --porcelain") ;;
esac
exit 0
"""


DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _run(
    tmp_path: Path, *args: str, missing: str = "", media_type: str = DOCKER_MANIFEST
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("aws", "docker", "git"):
        stand_in = bin_dir / tool
        stand_in.write_text(STAND_IN, encoding="utf-8")
        stand_in.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CALL_LOG": str(log),
        "MISSING_REPOSITORIES": missing,
        "PUSHED_MEDIA_TYPE": media_type,
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return result, calls


def test_given_region_and_no_tag_when_run_then_images_tagged_with_commit_and_deploy_command_printed(
    tmp_path: Path,
) -> None:
    result, calls = _run(tmp_path, "--region", "eu-west-1")

    pushed = [_output(call)["name"] for call in calls if call.startswith("docker buildx build")]
    assert result.returncode == 0, result.stderr
    assert pushed == [f"{REGISTRY}/loraflow-training:abc1234", f"{REGISTRY}/loraflow-inference:abc1234"]
    assert "sam deploy --region eu-west-1 --parameter-overrides ImageTag=abc1234" in result.stdout


def _output(call: str) -> dict[str, str]:
    """The `--output type=...,k=v` exporter settings of a logged `docker buildx build` call."""
    words = call.split()
    return dict(item.split("=", 1) for item in words[words.index("--output") + 1].split(","))


def test_given_run_when_images_built_then_buildkit_pushes_docker_media_types_without_attestations(
    tmp_path: Path,
) -> None:
    result, calls = _run(tmp_path, "--region", "eu-west-1", "--tag", "v1")

    builds = [call for call in calls if call.startswith("docker buildx")]
    assert result.returncode == 0, result.stderr
    assert len(builds) == 2
    for component, build in zip(("training", "inference"), builds, strict=True):
        words = build.split()
        # SageMaker refuses OCI indexes/manifests: no provenance or SBOM index, Docker v2 media types.
        assert words[:3] == ["docker", "buildx", "build"]
        assert {"--provenance=false", "--sbom=false"} <= set(words)
        assert words[words.index("--platform") + 1] == "linux/amd64"
        assert words[words.index("-f") + 1] == f"containers/{component}/Dockerfile"
        assert words[-1] == "."
        assert _output(build) == {
            "type": "image",
            "name": f"{REGISTRY}/loraflow-{component}:v1",
            "push": "true",
            "oci-mediatypes": "false",
        }


def test_given_registry_reports_an_oci_index_when_run_then_fails_before_printing_deploy(
    tmp_path: Path,
) -> None:
    result, calls = _run(tmp_path, "--region", "eu-west-1", "--tag", "v1", media_type=OCI_INDEX)

    assert result.returncode != 0
    assert OCI_INDEX in result.stderr
    assert "sam deploy" not in result.stdout
    assert [call for call in calls if call.startswith("aws ecr describe-images")] == [
        "aws ecr describe-images --region eu-west-1 --repository-name loraflow-training "
        "--image-ids imageTag=v1 --query imageDetails[0].imageManifestMediaType --output text"
    ]


def test_given_missing_repository_when_run_then_only_that_one_is_created_with_scanning(
    tmp_path: Path,
) -> None:
    result, calls = _run(tmp_path, "--region", "eu-west-1", "--tag", "v1", missing="loraflow-inference")

    created = [call for call in calls if call.startswith("aws ecr create-repository")]
    assert result.returncode == 0, result.stderr
    assert created == [
        "aws ecr create-repository --region eu-west-1 --repository-name loraflow-inference "
        "--image-scanning-configuration scanOnPush=true"
    ]


def test_given_repositories_exist_when_run_then_login_happens_before_the_first_push(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, "--region", "eu-west-1", "--tag", "v1")

    login = calls.index(f"docker login --username AWS --password-stdin {REGISTRY}")
    first_push = next(i for i, call in enumerate(calls) if call.startswith("docker buildx build"))
    assert result.returncode == 0, result.stderr
    assert not any(call.startswith("aws ecr create-repository") for call in calls)
    assert login < first_push


@pytest.mark.parametrize("args", [("--bogus",), ("--region",)])
def test_given_bad_arguments_when_run_then_exits_non_zero_without_building(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    result, calls = _run(tmp_path, *args)

    assert result.returncode != 0
    assert result.stderr
    assert not any(call.startswith("docker") for call in calls)
