"""The core's fast record construction behaves like the dataclasses it replaces, and stays frozen."""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field
from typing import Any

import pytest

from engine_server.core.frozen import evolve, fast_init
from engine_server.core.model import NodeRun, NodeState


@fast_init
@dataclass(frozen=True, slots=True)
class _Sample:
    name: str
    count: int = 1
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _WithoutSlots:
    name: str
    count: int = 1


def test_fast_init_takes_positional_keyword_and_default_arguments() -> None:
    assert _Sample("a") == _Sample(name="a", count=1, tags={})
    assert _Sample("a", 2, {"x": 1}).tags == {"x": 1}
    assert _Sample("a", count=3).count == 3
    assert repr(_Sample("a")) == "_Sample(name='a', count=1, tags={})"


def test_each_record_gets_its_own_default_from_a_factory() -> None:
    first, second = _Sample("a"), _Sample("b")
    assert first.tags is not second.tags


def test_fast_init_refuses_missing_and_unknown_arguments_like_a_dataclass() -> None:
    with pytest.raises(TypeError):
        _Sample()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _Sample("a", colour="red")  # type: ignore[call-arg]


def test_records_stay_frozen() -> None:
    run = NodeRun("n1", NodeState.RUNNING, "v1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.state = NodeState.FINISHED  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class _WithPostInit:
    name: str

    def __post_init__(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _WithInitVar:
    name: str
    extra: InitVar[int] = 0


@dataclass(frozen=True, slots=True)
class _WithPrivateField:
    _MISSING: str = "shadows the generated code's own names"


@dataclass(frozen=True, slots=True)
class _Inheriting(_Sample):
    more: int = 0


@pytest.mark.parametrize("record_class", [_WithPostInit, _WithInitVar, _WithPrivateField, _Inheriting])
def test_fast_init_refuses_a_class_it_would_build_differently(record_class: type[Any]) -> None:
    with pytest.raises(TypeError, match="plain public fields"):
        fast_init(record_class)


def test_evolve_changes_the_named_fields_of_a_copy_only() -> None:
    run = NodeRun("n1", NodeState.RUNNING, "v1", loop=2, outputs={"a": 1})
    done = evolve(run, state=NodeState.FINISHED, finished_at=5)
    assert done == dataclasses.replace(run, state=NodeState.FINISHED, finished_at=5)
    assert (run.state, run.finished_at) == (NodeState.RUNNING, 0)
    assert done.outputs is run.outputs


def test_evolve_refuses_an_unknown_field() -> None:
    with pytest.raises(TypeError, match="NodeRun has no field 'colour'"):
        evolve(NodeRun("n1", NodeState.RUNNING, "v1"), colour="red")


def test_evolve_works_on_a_frozen_dataclass_without_slots() -> None:
    record = _WithoutSlots("a")
    assert evolve(record, count=4) == _WithoutSlots("a", 4)
