"""CloudFormation intrinsic functions, resolved against parameters and already-created resources.

Supported: Ref (resources, parameters, pseudo parameters), Fn::GetAtt, Fn::Sub (both forms), Fn::Join,
Fn::Select, Fn::Split, Fn::If / AWS::NoValue, Fn::Equals, Fn::Not, Fn::And, Fn::Or, Condition,
Fn::FindInMap, Fn::Base64, Fn::GetAZs. Anything else (Fn::ImportValue: there are no other stacks
locally) is an error that names it, never a silent pass-through.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_SUB_VARIABLE = re.compile(r"\$\{([^}]*)\}")


class TemplateError(Exception):
    """The template cannot be run locally; the message says which resource or function and why."""


class _NoValue:
    """AWS::NoValue: removes the property or list item it stands for."""


NO_VALUE = _NoValue()


@dataclass
class Deployed:
    """What a created resource answers to Ref and Fn::GetAtt."""

    ref: Any
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Resolver:
    parameters: Mapping[str, Any]
    pseudo: Mapping[str, str]  # AWS::Region, AWS::AccountId, ...
    resources: Mapping[str, Deployed]
    conditions: Mapping[str, Any] = field(default_factory=dict)  # name → its (unresolved) expression
    mappings: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(item) for item in value]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, argument),) = value.items()
            if key == "Ref":
                return self.ref(argument)
            if key == "Condition" and isinstance(argument, str):
                return self.condition(argument)
            if key.startswith("Fn::"):
                return self._function(key, argument)
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.resources:
            return self.resources[name].ref
        raise TemplateError(f"Ref to {name!r}: no such parameter, or the resource is not created yet")

    def get_att(self, resource: str, attribute: str) -> Any:
        deployed = self.resources.get(resource)
        if deployed is None:
            raise TemplateError(f"Fn::GetAtt {resource}.{attribute}: the resource is not created yet")
        if attribute not in deployed.attributes:
            known = ", ".join(sorted(deployed.attributes)) or "none"
            raise TemplateError(f"Fn::GetAtt {resource}.{attribute}: unknown attribute (local ones: {known})")
        return deployed.attributes[attribute]

    def condition(self, name: str) -> bool:
        if name not in self.conditions:
            raise TemplateError(f"condition {name!r} is not defined")
        return bool(self.resolve(self.conditions[name]))

    def _function(self, name: str, argument: Any) -> Any:
        handler = getattr(self, "_fn_" + name[4:].lower(), None)
        if handler is None:
            raise TemplateError(f"{name} is not supported by the local cloud")
        return handler(argument)

    def _fn_getatt(self, argument: Any) -> Any:
        if isinstance(argument, str):
            resource, _, attribute = argument.partition(".")
        else:
            resource, attribute = argument[0], self.resolve(argument[1])
        return self.get_att(resource, attribute)

    def _fn_sub(self, argument: Any) -> str:
        template, variables = (argument, {}) if isinstance(argument, str) else (argument[0], argument[1])
        values = {key: self.resolve(item) for key, item in variables.items()}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"  # ${!Literal} stands for the text ${Literal}
            if name in values:
                return as_text(values[name])
            if "." in name and not name.startswith("AWS::"):
                resource, _, attribute = name.partition(".")
                return as_text(self.get_att(resource, attribute))
            return as_text(self.ref(name))

        return _SUB_VARIABLE.sub(replace, template)

    def _fn_join(self, argument: Any) -> str:
        delimiter, items = argument
        return str(delimiter).join(as_text(item) for item in self.resolve(items))

    def _fn_select(self, argument: Any) -> Any:
        index, items = self.resolve(argument)
        return items[int(index)]

    def _fn_split(self, argument: Any) -> list[str]:
        delimiter, text = self.resolve(argument)
        return str(text).split(delimiter)

    def _fn_if(self, argument: Any) -> Any:
        name, when_true, when_false = argument
        return self.resolve(when_true if self.condition(name) else when_false)

    def _fn_equals(self, argument: Any) -> bool:
        left, right = self.resolve(argument)
        return as_text(left) == as_text(right)

    def _fn_not(self, argument: Any) -> bool:
        return not self.resolve(argument[0])

    def _fn_and(self, argument: Any) -> bool:
        return all(self.resolve(item) for item in argument)

    def _fn_or(self, argument: Any) -> bool:
        return any(self.resolve(item) for item in argument)

    def _fn_findinmap(self, argument: Any) -> Any:
        mapping, top, second = self.resolve(argument)[:3]
        return self.mappings[mapping][top][second]

    def _fn_base64(self, argument: Any) -> str:
        return base64.b64encode(as_text(self.resolve(argument)).encode("utf-8")).decode("ascii")

    def _fn_getazs(self, argument: Any) -> list[str]:
        region = self.resolve(argument) or self.pseudo["AWS::Region"]
        return [f"{region}{zone}" for zone in "abc"]

    def _fn_importvalue(self, argument: Any) -> Any:
        raise TemplateError(f"Fn::ImportValue {argument!r}: the local cloud runs one stack, with no exports")


def as_text(value: Any) -> str:
    """How CloudFormation renders a value inside a string (numbers from Number parameters included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(as_text(item) for item in value)
    return str(value)


def references(value: Any) -> set[str]:
    """Logical names a value refers to through Ref, Fn::GetAtt or Fn::Sub (parameters included)."""
    found: set[str] = set()
    if isinstance(value, list):
        for item in value:
            found |= references(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key == "Ref" and isinstance(item, str):
                found.add(item)
            elif key == "Fn::GetAtt":
                found.add(item.partition(".")[0] if isinstance(item, str) else item[0])
            elif key == "Fn::Sub":
                template, variables = (item, {}) if isinstance(item, str) else (item[0], item[1])
                for name in _SUB_VARIABLE.findall(template):
                    if not name.startswith("!") and name not in variables:
                        found.add(name if name.startswith("AWS::") else name.partition(".")[0])
                found |= references(variables)
            else:
                found |= references(item)
    return found
