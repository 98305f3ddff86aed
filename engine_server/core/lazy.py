"""Resolvers of lazy variables (`{"type": "lazy", "custom_type": code, "value": v}`), by custom_type.

A resolver turns the variable's rendered value into its final value when its pipeline level starts.
They are pure functions; add one here to support a new custom_type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _lines(value: Any) -> list[str]:
    return [line.strip() for line in _text(value).splitlines() if line.strip()]


def _comma_list(value: Any) -> list[str]:
    return [part.strip() for part in _text(value).split(",") if part.strip()]


LAZY_RESOLVERS: dict[str, Callable[[Any], Any]] = {
    "upper_case": lambda value: _text(value).upper(),
    "lower_case": lambda value: _text(value).lower(),
    "strip": lambda value: _text(value).strip(),
    "int": lambda value: int(_text(value).strip()),
    "json": lambda value: json.loads(value) if isinstance(value, str) else value,
    "comma_list": _comma_list,
    "lines": _lines,
}


class LazyError(Exception):
    pass


def resolve_lazy(custom_type: str, value: Any) -> Any:
    try:
        return LAZY_RESOLVERS[custom_type](value)
    except Exception as exc:  # any resolver failure is a variable error, reported with the variable
        raise LazyError(f"lazy custom_type {custom_type!r} cannot resolve {value!r}: {exc}") from None
