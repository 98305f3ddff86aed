"""Rendering of variables: pipeline data inputs and component inputs.

A splice value is text with `${name}` references, inside strings at any depth of lists and dicts.
A string that is exactly one `${name}` keeps the referenced value's type; otherwise values are
substituted as text. Context keys are written as in the tree: "${name}".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from engine_server.core.model import VarSpec

# ${ anything up to the matching } (no nesting), and a bare variable name inside.
_SPLICE = re.compile(r"\$\{([^{}]*)\}")
_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*")


class RenderError(Exception):
    """A variable could not be rendered; the message names it."""


def splice_references(value: Any) -> tuple[set[str], list[str]]:
    """Returns (variable names referenced, expressions that are not plain names) in a splice value."""
    names: set[str] = set()
    others: list[str] = []
    for text in _strings(value):
        for match in _SPLICE.finditer(text):
            name = _NAME.fullmatch(match.group(1))
            if name:
                names.add(name.group(1))
            else:
                others.append(match.group(1))
    return names, others


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    return []


def context_key(name: str) -> str:
    """Start inputs may be keyed "name" or "${name}"; the context always uses "${name}"."""
    return name if name.startswith("${") and name.endswith("}") else f"${{{name}}}"


def render_context(inputs: Mapping[str, VarSpec], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Renders data.inputs, letting Start's inputs replace values; splices may refer to each other."""
    raw: dict[str, VarSpec] = dict(inputs)
    for key, value in overrides.items():
        raw[context_key(key)] = VarSpec("plain", value)
    rendered: dict[str, Any] = {}
    resolving: list[str] = []

    def resolve(key: str) -> Any:
        if key in rendered:
            return rendered[key]
        if key in resolving:
            chain = " -> ".join([*resolving[resolving.index(key) :], key])
            raise RenderError(f"variables refer to each other in a circle: {chain}")
        var = raw.get(key)
        if var is None:
            raise RenderError(f"variable {key} is not defined")
        resolving.append(key)
        value = _render_value(var.value, resolve) if var.type == "splice" else var.value
        resolving.pop()
        rendered[key] = value
        return value

    for key in raw:
        resolve(key)
    return rendered


def render_inputs(inputs: Mapping[str, VarSpec], context: Mapping[str, Any]) -> dict[str, Any]:
    def lookup(key: str) -> Any:
        if key not in context:
            raise RenderError(f"variable {key} is not defined")
        return context[key]

    return {key: _render_value(var.value, lookup) if var.type == "splice" else var.value for key, var in inputs.items()}


def _render_value(value: Any, lookup: Any) -> Any:
    if isinstance(value, str):
        return _render_text(value, lookup)
    if isinstance(value, list):
        return [_render_value(item, lookup) for item in value]
    if isinstance(value, dict):
        return {key: _render_value(item, lookup) for key, item in value.items()}
    return value


def _render_text(text: str, lookup: Any) -> Any:
    if "${" not in text:
        return text
    whole = _SPLICE.fullmatch(text)
    if whole:
        name = _NAME.fullmatch(whole.group(1))
        if name:
            return lookup(f"${{{name.group(1)}}}")

    def substitute(match: re.Match[str]) -> str:
        name = _NAME.fullmatch(match.group(1))
        if not name:
            raise RenderError(f"cannot render ${{{match.group(1)}}}: only variable names are supported")
        value = lookup(f"${{{name.group(1)}}}")
        # str(), as bamboo's renderer does, so existing trees render the same text.
        return value if isinstance(value, str) else str(value)

    return _SPLICE.sub(substitute, text)
