"""The shared layer deploys the exact package versions the tests run with (requirements/constraints.txt)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from template_helpers import REPO_ROOT

LAYER_REQUIREMENTS = REPO_ROOT / "layers" / "shared" / "requirements.txt"
CONSTRAINTS = REPO_ROOT / "requirements" / "constraints.txt"
REQUIREMENT = re.compile(r"(?P<name>[A-Za-z0-9._-]+)(\[[^\]]*\])?\s*(?P<specifier>.*)")


def _canonical(name: str) -> str:
    """PEP 503 normalisation: `aws_lambda_powertools` and `AWS-Lambda-Powertools` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: Path) -> dict[str, str]:
    """`name -> specifier` of each requirement line (comments and blank lines skipped)."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.split("#", 1)[0].strip()
        match = REQUIREMENT.fullmatch(text)
        if match:
            found[_canonical(match["name"])] = match["specifier"].strip()
    return found


def _unpinned(layer: dict[str, str], constraints: dict[str, str]) -> list[str]:
    """Layer requirements that are not exactly the constraints' `==` pin."""
    return sorted(
        name for name, spec in layer.items() if not spec.startswith("==") or spec != constraints.get(name)
    )


def test_given_layer_requirements_when_compared_with_constraints_then_each_is_the_same_exact_pin() -> None:
    layer = _requirements(LAYER_REQUIREMENTS)

    assert set(layer) == {"aws-lambda-powertools", "pydantic", "pillow"}
    assert _unpinned(layer, _requirements(CONSTRAINTS)) == []


@pytest.mark.parametrize("drifted", ["pydantic>=2.9", "pydantic", "pydantic==2.0.0"])
def test_given_layer_requirement_drifting_from_constraints_when_compared_then_reported(
    tmp_path: Path, drifted: str
) -> None:
    layer_file = tmp_path / "requirements.txt"
    layer_file.write_text(f"aws-lambda-powertools==3.37.0\n{drifted}\n", encoding="utf-8")
    constraints = {"aws-lambda-powertools": "==3.37.0", "pydantic": "==2.13.5"}

    assert _unpinned(_requirements(layer_file), constraints) == ["pydantic"]
