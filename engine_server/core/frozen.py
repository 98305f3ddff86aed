"""Faster construction for the core's frozen slots dataclasses, which the engine builds thousands of per second.

A frozen dataclass's generated `__init__` must go around its own `__setattr__` (which refuses every write), so
it calls `object.__setattr__(self, "name", value)` for each field: a global lookup, an attribute lookup and a
by-name slot search per field. A NodeRun (16 fields) cost about 3 µs to build that way, and a batch builds
a dozen such records per operation. `fast_init` gives the class an `__init__` with the same signature that
stores each field through its slot's own descriptor instead; `evolve` (the core's `dataclasses.replace`) does
the same. The classes stay frozen: assigning to a field still raises FrozenInstanceError.
"""

from __future__ import annotations

import types
from dataclasses import MISSING, fields
from typing import Any, TypeVar

_Record = TypeVar("_Record")

# Per class: a function (record, changes) -> a copy with those fields changed.
_EVOLVERS: dict[type[Any], Any] = {}


def fast_init(cls: type[_Record]) -> type[_Record]:
    """Class decorator, applied over @dataclass(frozen=True, slots=True)."""
    record_fields = fields(cls)  # type: ignore[arg-type]
    declared = cls.__dict__.get("__dataclass_fields__", {})
    if (
        hasattr(cls, "__post_init__")
        or len(declared) != len(record_fields)  # an InitVar or a ClassVar
        or any(not f.init or f.kw_only or f.name.startswith("_") for f in record_fields)
        or any(not isinstance(cls.__dict__.get(f.name), types.MemberDescriptorType) for f in record_fields)
    ):
        raise TypeError(
            f"{cls.__name__}: fast_init supports a frozen slots dataclass of plain public fields, declared on the "
            "class itself (no __post_init__, InitVar, ClassVar, init=False, kw_only or inherited fields)"
        )
    namespace: dict[str, Any] = {"_MISSING": MISSING}
    parameters: list[str] = []
    body: list[str] = []
    for number, f in enumerate(record_fields):
        namespace[f"_set{number}"] = cls.__dict__[f.name].__set__  # the slot's member descriptor
        if f.default is not MISSING:
            namespace[f"_default{number}"] = f.default
            parameters.append(f"{f.name}=_default{number}")
            body.append(f"    _set{number}(self, {f.name})")
        elif f.default_factory is not MISSING:
            namespace[f"_factory{number}"] = f.default_factory
            parameters.append(f"{f.name}=_MISSING")
            body.append(f"    _set{number}(self, _factory{number}() if {f.name} is _MISSING else {f.name})")
        else:
            parameters.append(f.name)
            body.append(f"    _set{number}(self, {f.name})")
    exec(f"def __init__(self, {', '.join(parameters)}):\n" + "\n".join(body or ["    pass"]), namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


def _evolver(cls: type[Any]) -> Any:
    names = tuple(f.name for f in fields(cls))
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_names": frozenset(names)}
    body = [
        "def evolve(record, changes):",
        "    for name in changes:",
        "        if name not in _names:",
        "            raise TypeError(f'{_cls.__name__} has no field {name!r}')",
        "    new = _new(_cls)",
    ]
    for number, name in enumerate(names):
        slot = cls.__dict__.get(name)
        if isinstance(slot, types.MemberDescriptorType):
            namespace[f"_set{number}"] = slot.__set__
        else:  # a class without slots
            namespace[f"_set{number}"] = lambda record, value, name=name: object.__setattr__(record, name, value)
        body.append(f"    _set{number}(new, changes[{name!r}] if {name!r} in changes else record.{name})")
    body.append("    return new")
    exec("\n".join(body), namespace)
    return namespace["evolve"]


def evolve(record: _Record, **changes: Any) -> _Record:
    """`dataclasses.replace` for the core's frozen slots records (none has a __post_init__), at a fraction of its
    cost: replace() re-inspects the class and goes through __init__ on every call."""
    cls = type(record)
    evolver = _EVOLVERS.get(cls)
    if evolver is None:
        evolver = _EVOLVERS[cls] = _evolver(cls)
    new: _Record = evolver(record, changes)
    return new
