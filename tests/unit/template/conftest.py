"""Fixtures: the SAM template as written, as transformed by SAM (offline), and the state machine ASL.

Assertions run on the *transformed* template wherever SAM generates resources (roles, event
source mappings), because that is what CloudFormation deploys.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from template_helpers import ASL_PATH, load_template, transform


@pytest.fixture(scope="session")
def template() -> dict[str, Any]:
    return load_template()


@pytest.fixture(scope="session")
def transformed(template: dict[str, Any]) -> dict[str, Any]:
    return transform(template)


@pytest.fixture(scope="session")
def asl_text() -> str:
    return ASL_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def asl(asl_text: str) -> dict[str, Any]:
    definition: dict[str, Any] = json.loads(asl_text)
    return definition
