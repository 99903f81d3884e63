"""template.yaml → plain CloudFormation resources in creation order, offline.

The SAM transform runs offline once local paths (CodeUri, ContentUri, DefinitionUri) are replaced by
`s3://loraflow-local-code/<LogicalId>/<Property>` placeholders; the placeholders map back to the local
folders, so the local cloud runs the code the template names.
"""

from __future__ import annotations

import copy
import graphlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from cfnlint.decode import decode
from samtranslator.model.exceptions import InvalidDocumentException
from samtranslator.parser.parser import Parser
from samtranslator.translator.translator import Translator

from loraflow_local.intrinsics import Resolver, TemplateError, as_text, references

PLACEHOLDER_BUCKET = "loraflow-local-code"
_LOCAL_PATH_PROPERTIES = {
    "AWS::Serverless::Function": "CodeUri",
    "AWS::Serverless::LayerVersion": "ContentUri",
    "AWS::Serverless::StateMachine": "DefinitionUri",
    "AWS::Serverless::Api": "DefinitionUri",
    "AWS::Serverless::HttpApi": "DefinitionUri",
}


@dataclass(frozen=True)
class StackTemplate:
    path: Path
    resources: dict[str, dict[str, Any]]  # transformed, with conditions applied
    parameters: dict[str, Any]
    conditions: dict[str, Any]
    mappings: dict[str, Any]
    local_paths: dict[str, Path]  # placeholder S3 key → the local file or folder it stands for

    def local_path(self, bucket: str, key: str) -> Path:
        if bucket != PLACEHOLDER_BUCKET or key not in self.local_paths:
            raise TemplateError(f"s3://{bucket}/{key} is not a local path of the template")
        return self.local_paths[key]

    def creation_order(self) -> list[str]:
        """Logical ids, each after everything it refers to or DependsOn."""
        sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
        for logical_id in sorted(self.resources):
            resource = self.resources[logical_id]
            depends_on = resource.get("DependsOn", [])
            needed = references(resource.get("Properties", {})) | set(
                [depends_on] if isinstance(depends_on, str) else depends_on
            )
            sorter.add(logical_id, *sorted(name for name in needed if name in self.resources))
        try:
            return list(sorter.static_order())
        except graphlib.CycleError as error:
            raise TemplateError(f"the resources depend on each other in a cycle: {error.args[1]}") from error


def load_template(
    path: Path, region: str, overrides: Mapping[str, str], local_defaults: Mapping[str, str] | None = None
) -> StackTemplate:
    """Decode, check parameters, SAM-transform. `local_defaults` replace the defaults of the parameters
    the template declares (unknown names are ignored); `overrides` must name declared parameters."""
    template, problems = decode(str(path))
    if problems or template is None:
        raise TemplateError(f"{path} cannot be read: " + "; ".join(str(problem) for problem in problems))
    declared = template.get("Parameters", {})
    defaults = {name: value for name, value in (local_defaults or {}).items() if name in declared}
    _check_overrides(declared, overrides)
    parameters = resolve_parameters(declared, {**defaults, **overrides})
    local_paths = _replace_local_paths(template, path.parent)
    transformed = _sam_transform(template, parameters, region)
    conditions = transformed.get("Conditions", {})
    resolver = Resolver(parameters, {"AWS::Region": region}, {}, conditions, transformed.get("Mappings", {}))
    resources = {
        logical_id: resource
        for logical_id, resource in transformed["Resources"].items()
        if "Condition" not in resource or resolver.condition(resource["Condition"])
    }
    return StackTemplate(
        path=path,
        resources=resources,
        parameters=parameters,
        conditions=conditions,
        mappings=transformed.get("Mappings", {}),
        local_paths=local_paths,
    )


def resolve_parameters(declared: Mapping[str, Any], overrides: Mapping[str, str]) -> dict[str, Any]:
    """Defaults plus overrides, checked as CloudFormation checks them; Number values become numbers."""
    _check_overrides(declared, overrides)
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in overrides:
            raw = str(overrides[name])
        elif "Default" in spec:
            raw = str(spec["Default"])
        else:
            raise TemplateError(f"parameter {name} has no default and no override")
        allowed = spec.get("AllowedValues")
        if allowed is not None and raw not in [str(value) for value in allowed]:
            raise TemplateError(f"parameter {name}={raw!r} is not one of {allowed}")
        values[name] = _typed_parameter(name, spec, raw)
    return values


def _check_overrides(declared: Mapping[str, Any], overrides: Mapping[str, str]) -> None:
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise TemplateError(f"parameter overrides name no template parameter: {', '.join(unknown)}")


def _typed_parameter(name: str, spec: Mapping[str, Any], raw: str) -> Any:
    kind = spec.get("Type", "String")
    if kind == "Number":
        try:
            number = float(raw)
        except ValueError:
            raise TemplateError(f"parameter {name}={raw!r} is not a number") from None
        low, high = spec.get("MinValue"), spec.get("MaxValue")
        if (low is not None and number < float(low)) or (high is not None and number > float(high)):
            raise TemplateError(f"parameter {name}={raw} is outside [{low}, {high}]")
        return int(number) if number.is_integer() else number
    if kind == "CommaDelimitedList" or kind.startswith("List<"):
        return [item.strip() for item in raw.split(",")] if raw else []
    return raw


def _replace_local_paths(template: dict[str, Any], root: Path) -> dict[str, Path]:
    local_paths: dict[str, Path] = {}
    for logical_id, resource in template.get("Resources", {}).items():
        prop = _LOCAL_PATH_PROPERTIES.get(resource.get("Type", ""))
        properties = resource.get("Properties") or {}
        value = properties.get(prop) if prop else None
        if isinstance(value, str) and not value.startswith("s3://"):
            key = f"{logical_id}/{prop}"
            local_paths[key] = (root / value).resolve()
            properties[prop] = f"s3://{PLACEHOLDER_BUCKET}/{key}"
    global_function = template.get("Globals", {}).get("Function", {})
    if isinstance(global_function.get("CodeUri"), str) and not global_function["CodeUri"].startswith("s3://"):
        local_paths["Globals/CodeUri"] = (root / global_function["CodeUri"]).resolve()
        global_function["CodeUri"] = f"s3://{PLACEHOLDER_BUCKET}/Globals/CodeUri"
    return local_paths


def _sam_transform(template: dict[str, Any], parameters: Mapping[str, Any], region: str) -> dict[str, Any]:
    if "Transform" not in template:
        return copy.deepcopy(template)
    values = {name: as_text(v) for name, v in parameters.items()}
    translator = Translator(None, Parser(), boto_session=boto3.session.Session(region_name=region))
    try:
        transformed: dict[str, Any] = translator.translate(
            copy.deepcopy(template), values, get_managed_policy_map=lambda: {}
        )
    except InvalidDocumentException as error:
        messages = "; ".join(str(cause) for cause in error.causes)
        raise TemplateError(f"the SAM transform rejects the template: {messages}") from error
    return transformed
