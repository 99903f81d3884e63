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
# $MISSING_REPOSITORIES, like the real CLI does for a repository that does not exist.
STAND_IN = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALL_LOG"
case "$(basename "$0") $*" in
  "aws sts get-caller-identity"*) echo 123456789012 ;;
  "aws ecr describe-repositories"*)
    for name in $MISSING_REPOSITORIES; do [[ "$*" == *"--repository-names $name"* ]] && exit 254; done ;;
  "aws ecr get-login-password"*) echo token ;;
  "docker login"*) cat > /dev/null ;;  # reads the password from stdin, as docker does
  "git rev-parse --short HEAD") echo abc1234 ;;
  "git status --porcelain") ;;
esac
exit 0
"""


def _run(tmp_path: Path, *args: str, missing: str = "") -> tuple[subprocess.CompletedProcess[str], list[str]]:
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

    assert result.returncode == 0, result.stderr
    assert f"docker push {REGISTRY}/loraflow-training:abc1234" in calls
    assert f"docker push {REGISTRY}/loraflow-inference:abc1234" in calls
    build = "docker build --platform linux/amd64 -f containers/training/Dockerfile"
    assert f"{build} -t {REGISTRY}/loraflow-training:abc1234 ." in calls
    assert "sam deploy --region eu-west-1 --parameter-overrides ImageTag=abc1234" in result.stdout


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
    first_push = next(i for i, call in enumerate(calls) if call.startswith("docker push"))
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
