"""Reading the SAM template, transforming it offline, and walking its IAM policies (test helpers)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from boto3.session import Session
from cfnlint.decode import decode
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator

REPO_ROOT = Path(__file__).resolve().parents[3]
TEMPLATE_PATH = REPO_ROOT / "template.yaml"
ASL_PATH = REPO_ROOT / "statemachines" / "training_pipeline.asl.json"

# SAM's transform wants artifacts already uploaded: local paths are swapped for placeholder S3 URIs.
_LOCAL_URI_PROPERTIES = ("CodeUri", "ContentUri", "DefinitionUri")

ASL_SUBSTITUTION = re.compile(r"\$\{([^}]+)\}")


def load_template() -> dict[str, Any]:
    template, errors = decode(str(TEMPLATE_PATH))
    if errors or template is None:
        raise AssertionError(f"template.yaml does not parse: {errors}")
    return dict(template)


def transform(template: dict[str, Any]) -> dict[str, Any]:
    """Run the SAM transform offline (no AWS calls), as `sam deploy` would before CloudFormation."""
    packaged = copy.deepcopy(template)
    for resource in packaged["Resources"].values():
        properties = resource.get("Properties", {})
        for name in _LOCAL_URI_PROPERTIES:
            value = properties.get(name)
            if isinstance(value, str) and not value.startswith("s3://"):
                properties[name] = f"s3://loraflow-packaging/{value}"
    translator = Translator(None, Parser(), boto_session=Session(region_name="us-east-1"))
    result: dict[str, Any] = translator.translate(packaged, {}, get_managed_policy_map=lambda: {})
    return result


def resources_of_type(template: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {
        logical_id: resource
        for logical_id, resource in template["Resources"].items()
        if resource["Type"] == resource_type
    }


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# Identity policies (other than roles' inline ones) and resource policies: one PolicyDocument each.
_SINGLE_DOCUMENT_TYPES = {
    "AWS::IAM::Policy",
    "AWS::IAM::ManagedPolicy",
    "AWS::S3::BucketPolicy",
    "AWS::SQS::QueuePolicy",
    "AWS::SNS::TopicPolicy",
}


def _policy_documents(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    properties = resource.get("Properties", {})
    if resource["Type"] == "AWS::IAM::Role":
        for policy in properties.get("Policies", []):
            yield policy["PolicyDocument"]
    elif resource["Type"] in _SINGLE_DOCUMENT_TYPES:
        yield properties["PolicyDocument"]


def policy_statements(template: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every statement of every identity or resource policy, with the logical id holding it."""
    for logical_id, resource in template["Resources"].items():
        for document in _policy_documents(resource):
            for statement in as_list(document["Statement"]):
                yield logical_id, statement


def wildcard_actions(statement: dict[str, Any]) -> list[str]:
    """Actions of an Allow statement that grant more than one named action ('*', 's3:*', 's3:Get*')."""
    if statement.get("Effect") != "Allow":
        return []
    if "NotAction" in statement:
        return [f"NotAction {statement['NotAction']}"]
    return [action for action in as_list(statement["Action"]) if "*" in action]


def substitute(asl_text: str, values: dict[str, str]) -> dict[str, Any]:
    """Apply DefinitionSubstitutions as CloudFormation does (plain text), then parse the definition."""
    definition: dict[str, Any] = json.loads(
        ASL_SUBSTITUTION.sub(lambda match: values[match.group(1)], asl_text)
    )
    return definition
