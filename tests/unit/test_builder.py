"""The pipeline builder produces bamboo-engine's tree layout, node for node."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator

import pytest

from worker_sdk import builder
from worker_sdk.builder import (
    ConditionalParallelGateway,
    ConvergeGateway,
    Data,
    DataInput,
    EmptyEndEvent,
    EmptyStartEvent,
    ExclusiveGateway,
    ExecutableEndEvent,
    NodeOutput,
    ParallelGateway,
    Params,
    RewritableNodeOutput,
    ServiceActivity,
    SubProcess,
    Var,
    build_tree,
)


@pytest.fixture
def sequential_ids(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Replaces uuid-based ids with "<prefix><n>" so whole trees can be compared exactly."""
    counters: dict[str, Iterator[int]] = {}

    def next_id(prefix: str) -> str:
        counter = counters.setdefault(prefix, itertools.count(1))
        return f"{prefix}{next(counter)}"

    monkeypatch.setattr(builder, "_unique_id", next_id)
    yield


def activity_node(
    node_id: str,
    incoming: list[str],
    outgoing: str,
    code: str,
    inputs: dict[str, object] | None = None,
    **fields: object,
) -> dict[str, object]:
    node: dict[str, object] = {
        "incoming": incoming,
        "outgoing": outgoing,
        "type": "ServiceActivity",
        "id": node_id,
        "name": None,
        "error_ignorable": False,
        "timeout": None,
        "skippable": True,
        "retryable": True,
        "component": {"code": code, "inputs": inputs or {}, "version": "legacy"},
        "optional": False,
    }
    node.update(fields)
    return node


def flow(flow_id: str, source: str, target: str) -> dict[str, object]:
    return {"is_default": False, "source": source, "target": target, "id": flow_id}


@pytest.mark.usefixtures("sequential_ids")
def test_serial_chain_builds_bamboo_tree() -> None:
    start = EmptyStartEvent()
    first = ServiceActivity(component_code="add", name="first")
    first.component.inputs.a = Var(type=Var.PLAIN, value=1)
    first.component.inputs["b"] = Var(type=Var.SPLICE, value="${b}")
    second = ServiceActivity(component_code="echo", error_ignorable=True, skippable=False, retryable=False)
    end = EmptyEndEvent()
    start.extend(first).extend(second).extend(end)
    data = Data()
    data.inputs["${b}"] = Var(type=Var.PLAIN, value=2)
    data.outputs.append("${b}")

    tree = build_tree(start, data=data)

    assert tree == {
        "id": "p1",
        "start_event": {"incoming": "", "outgoing": "f1", "type": "EmptyStartEvent", "id": "e1", "name": None},
        "end_event": {"incoming": ["f3"], "outgoing": "", "type": "EmptyEndEvent", "id": "e4", "name": None},
        "activities": {
            "e2": activity_node(
                "e2",
                ["f1"],
                "f2",
                "add",
                {"a": {"type": "plain", "value": 1}, "b": {"type": "splice", "value": "${b}"}},
                name="first",
            ),
            "e3": activity_node("e3", ["f2"], "f3", "echo", error_ignorable=True, skippable=False, retryable=False),
        },
        "gateways": {},
        "flows": {"f1": flow("f1", "e1", "e2"), "f2": flow("f2", "e2", "e3"), "f3": flow("f3", "e3", "e4")},
        "data": {"inputs": {"${b}": {"type": "plain", "value": 2}}, "outputs": ["${b}"], "pre_render_keys": []},
    }
    assert json.loads(json.dumps(tree)) == tree


def test_generated_ids_follow_bamboo_scheme() -> None:
    start = EmptyStartEvent()
    start.extend(ServiceActivity(component_code="a")).extend(EmptyEndEvent())

    tree = build_tree(start)

    assert re.fullmatch(r"p[0-9a-f]{32}", tree["id"])
    assert re.fullmatch(r"e[0-9a-f]{32}", tree["start_event"]["id"])
    assert re.fullmatch(r"e[0-9a-f]{32}", tree["end_event"]["id"])
    assert all(re.fullmatch(r"e[0-9a-f]{32}", node_id) for node_id in tree["activities"])
    assert all(re.fullmatch(r"f[0-9a-f]{32}", flow_id) for flow_id in tree["flows"])
    assert len({*tree["activities"], *tree["flows"], tree["id"]}) == 4


def test_explicit_ids_and_tree_id_are_kept() -> None:
    start = EmptyStartEvent(id="start", name="Start")
    start.extend(ServiceActivity(component_code="a", id="act")).extend(EmptyEndEvent(id="end"))

    tree = build_tree(start, id="my-pipeline")

    assert tree["id"] == "my-pipeline"
    assert tree["start_event"]["name"] == "Start"
    assert list(tree["activities"]) == ["act"]
    assert tree["end_event"]["id"] == "end"


def test_data_defaults_to_empty_inputs_and_outputs() -> None:
    start = EmptyStartEvent()
    start.extend(EmptyEndEvent())

    assert build_tree(start)["data"] == {"inputs": {}, "outputs": []}
    assert build_tree(start, data={"inputs": {"${x}": {"type": "plain", "value": 1}}, "outputs": []})["data"] == {
        "inputs": {"${x}": {"type": "plain", "value": 1}},
        "outputs": [],
    }


@pytest.mark.usefixtures("sequential_ids")
def test_parallel_gateway_and_converge() -> None:
    start = EmptyStartEvent()
    fork = ParallelGateway()
    left = ServiceActivity(component_code="left")
    right = ServiceActivity(component_code="right")
    join = ConvergeGateway()
    end = EmptyEndEvent()
    start.extend(fork).connect(left, right).to(fork).converge(join).extend(end)

    tree = build_tree(start)

    assert tree["gateways"] == {
        "e2": {"id": "e2", "incoming": ["f1"], "outgoing": ["f2", "f3"], "type": "ParallelGateway", "name": None},
        "e5": {"id": "e5", "incoming": ["f4", "f5"], "outgoing": "f6", "type": "ConvergeGateway", "name": None},
    }
    assert tree["activities"]["e3"]["incoming"] == ["f2"]
    assert tree["activities"]["e3"]["outgoing"] == "f4"
    assert tree["activities"]["e4"]["outgoing"] == "f5"
    assert tree["end_event"]["incoming"] == ["f6"]
    assert tree["flows"]["f3"] == flow("f3", "e2", "e4")


@pytest.mark.usefixtures("sequential_ids")
def test_exclusive_gateway_conditions_by_index_and_default() -> None:
    start = EmptyStartEvent()
    gateway = ExclusiveGateway(conditions={0: "${x} > 1", 1: "${x} <= 1"}, name="choose")
    big = ServiceActivity(component_code="big")
    small = ServiceActivity(component_code="small")
    other = ServiceActivity(component_code="other")
    join = ConvergeGateway()
    gateway.default_condition_outgoing = 2
    start.extend(gateway).connect(big, small, other).to(gateway).converge(join).extend(EmptyEndEvent())

    tree = build_tree(start)

    assert tree["gateways"]["e2"] == {
        "id": "e2",
        "incoming": ["f1"],
        "outgoing": ["f2", "f3", "f4"],
        "type": "ExclusiveGateway",
        "name": "choose",
        "conditions": {"f2": {"evaluate": "${x} > 1"}, "f3": {"evaluate": "${x} <= 1"}},
        "default_condition": {"flow_id": "f4"},
    }


@pytest.mark.usefixtures("sequential_ids")
def test_gateway_conditions_may_name_the_target_element() -> None:
    start = EmptyStartEvent()
    yes = ServiceActivity(component_code="yes", id="yes")
    no = ServiceActivity(component_code="no", id="no")
    gateway = ConditionalParallelGateway(conditions={yes: "${a} == 1", "no": "${b} == 1"})
    start.extend(gateway).connect(yes, no).to(gateway).converge(ConvergeGateway()).extend(EmptyEndEvent())

    node = build_tree(start)["gateways"][gateway.id]

    assert node["type"] == "ConditionalParallelGateway"
    assert node["conditions"] == {"f2": {"evaluate": "${a} == 1"}, "f3": {"evaluate": "${b} == 1"}}
    assert node["default_condition"] == {}


def test_branch_without_condition_or_default_is_refused() -> None:
    start = EmptyStartEvent()
    gateway = ExclusiveGateway(conditions={0: "True"}, id="gw")
    start.extend(gateway).connect(ServiceActivity(component_code="a"), ServiceActivity(component_code="b", id="b"))

    with pytest.raises(ValueError, match=r"ExclusiveGateway gw: the branch to b has no condition"):
        build_tree(start)


def test_condition_index_out_of_range_is_refused() -> None:
    start = EmptyStartEvent()
    gateway = ExclusiveGateway(conditions={3: "True"}, id="gw")
    start.extend(gateway).connect(ServiceActivity(component_code="a"))

    with pytest.raises(ValueError, match="branch index 3 is out of range"):
        build_tree(start)


@pytest.mark.usefixtures("sequential_ids")
def test_loop_through_exclusive_gateway_lists_both_incoming_flows() -> None:
    start = EmptyStartEvent()
    work = ServiceActivity(component_code="work")
    gateway = ExclusiveGateway(conditions={0: "${n} < 3", 1: "${n} >= 3"})
    end = EmptyEndEvent()
    start.extend(work).extend(gateway).connect(work, end)

    tree = build_tree(start)

    assert tree["activities"]["e2"]["incoming"] == ["f1", "f3"]
    assert tree["flows"]["f3"] == flow("f3", "e3", "e2")
    assert tree["end_event"]["incoming"] == ["f4"]


@pytest.mark.usefixtures("sequential_ids")
def test_subprocess_nests_a_tree_with_params() -> None:
    sub_start = EmptyStartEvent()
    sub_act = ServiceActivity(component_code="inner")
    sub_act.component.inputs.value = Var(type=Var.SPLICE, value="${sub_input}")
    sub_start.extend(sub_act).extend(EmptyEndEvent())
    sub_data = Data()
    sub_data.inputs["${sub_input}"] = DataInput(type=Var.PLAIN, value="default")
    sub_data.inputs["${sub_output}"] = NodeOutput(source_act=sub_act.id, source_key="result")
    sub_data.outputs.append("${sub_output}")
    params = Params({"${sub_input}": Var(type=Var.SPLICE, value="${parent_input}")})

    start = EmptyStartEvent()
    sub = SubProcess(start=sub_start, data=sub_data, params=params, name="child")
    start.extend(sub).extend(EmptyEndEvent())

    tree = build_tree(start)

    node = tree["activities"][sub.id]
    assert list(node) == ["id", "incoming", "name", "outgoing", "type", "params", "pipeline"]
    assert node["type"] == "SubProcess"
    assert node["name"] == "child"
    assert node["params"] == {"${sub_input}": {"type": "splice", "value": "${parent_input}"}}
    nested = node["pipeline"]
    assert nested["id"] == sub.id
    assert nested["activities"][sub_act.id]["component"]["inputs"] == {
        "value": {"type": "splice", "value": "${sub_input}"}
    }
    assert nested["data"] == {
        "inputs": {
            "${sub_input}": {"type": "plain", "value": "default", "is_param": True},
            "${sub_output}": {"type": "splice", "value": None, "source_act": sub_act.id, "source_key": "result"},
        },
        "outputs": ["${sub_output}"],
        "pre_render_keys": [],
    }
    # Flow ids stay unique across the nested trees.
    assert not set(nested["flows"]) & set(tree["flows"])


def test_subprocess_params_may_be_a_plain_dict() -> None:
    sub_start = EmptyStartEvent()
    sub_start.extend(EmptyEndEvent())
    start = EmptyStartEvent()
    sub = SubProcess(
        start=sub_start, params={"${k}": Var(type=Var.PLAIN, value=1), "${j}": {"type": "plain", "value": 2}}
    )
    start.extend(sub).extend(EmptyEndEvent())

    assert build_tree(start)["activities"][sub.id]["params"] == {
        "${k}": {"type": "plain", "value": 1},
        "${j}": {"type": "plain", "value": 2},
    }


def test_variable_dicts() -> None:
    assert Var(type=Var.PLAIN, value=[1, "a"]).to_dict() == {"type": "plain", "value": [1, "a"]}
    assert Var(type=Var.LAZY, value="x", custom_type="ip").to_dict() == {
        "type": "lazy",
        "value": "x",
        "custom_type": "ip",
    }
    assert NodeOutput(source_act="n1", source_key="k").to_dict() == {
        "type": "splice",
        "value": None,
        "source_act": "n1",
        "source_key": "k",
    }
    assert NodeOutput(type=Var.PLAIN, source_act="n1", source_key="k").to_dict()["type"] == "plain"
    assert RewritableNodeOutput(
        source_act=[{"source_act": "n1", "source_key": "a"}, {"source_act": "n2", "source_key": "b"}]
    ).to_dict() == {
        "type": "splice",
        "value": None,
        "source_act": [{"source_act": "n1", "source_key": "a"}, {"source_act": "n2", "source_key": "b"}],
    }
    assert DataInput(type=Var.SPLICE, value="${a}").to_dict() == {"type": "splice", "value": "${a}", "is_param": True}


def test_activity_options_are_written_only_when_set() -> None:
    start = EmptyStartEvent()
    plain = ServiceActivity(component_code="plain")
    tuned = ServiceActivity(
        component_code="tuned",
        component_version="v2",
        timeout_config={"enable": True, "seconds": 10, "action": "forced_fail"},
        auto_retry={"enable": True, "times": 3, "interval": 5},
    )
    start.extend(plain).extend(tuned).extend(EmptyEndEvent())

    activities = build_tree(start)["activities"]

    assert "timeout_config" not in activities[plain.id]
    assert "auto_retry" not in activities[plain.id]
    assert activities[tuned.id]["component"] == {"code": "tuned", "inputs": {}, "version": "v2"}
    assert activities[tuned.id]["timeout_config"] == {"enable": True, "seconds": 10, "action": "forced_fail"}
    assert activities[tuned.id]["auto_retry"] == {"enable": True, "times": 3, "interval": 5}


def test_component_inputs_allow_attribute_and_item_access() -> None:
    act = ServiceActivity(component_code="c")
    act.component.inputs.first = Var(type=Var.PLAIN, value=1)
    act.component.inputs["second"] = Var(type=Var.PLAIN, value=2)

    assert act.component.inputs["first"].value == 1
    assert act.component.inputs.second.value == 2
    with pytest.raises(AttributeError):
        _ = act.component.inputs.missing
    assert list(act.component_dict()["inputs"]) == ["first", "second"]


def test_executable_end_event_keeps_its_type() -> None:
    start = EmptyStartEvent()
    end = ExecutableEndEvent(type="NotifyEndEvent", id="end")
    start.extend(ServiceActivity(component_code="a")).extend(end)

    tree = build_tree(start)

    assert tree["end_event"]["type"] == "NotifyEndEvent"
    assert tree["end_event"]["id"] == "end"
    assert isinstance(tree["end_event"]["incoming"], list)


def test_extend_connect_converge_and_tail() -> None:
    start = EmptyStartEvent()
    gateway = ParallelGateway()
    a1, a2, b1 = (ServiceActivity(component_code=code) for code in ("a1", "a2", "b1"))
    join = ConvergeGateway()

    assert start.extend(gateway) is gateway
    assert gateway.connect(a1, b1) is gateway
    a1.extend(a2)
    assert gateway.tail() is a2
    assert gateway.converge(join) is join
    assert a2.outgoing == [join]
    assert b1.outgoing == [join]
    assert start.to(join) is join


def test_activity_with_two_outgoing_connections_is_refused() -> None:
    start = EmptyStartEvent()
    act = ServiceActivity(component_code="a", id="act")
    start.extend(act).connect(EmptyEndEvent(), ServiceActivity(component_code="b"))

    with pytest.raises(ValueError, match="ServiceActivity act has 2 outgoing connections"):
        build_tree(start)


def test_two_end_events_are_refused() -> None:
    start = EmptyStartEvent()
    gateway = ParallelGateway()
    start.extend(gateway).connect(EmptyEndEvent(id="end1"), EmptyEndEvent(id="end2"))

    with pytest.raises(ValueError, match="one end event"):
        build_tree(start)


def test_distinct_elements_sharing_an_id_are_refused() -> None:
    start = EmptyStartEvent()
    start.extend(ServiceActivity(component_code="a", id="same")).extend(ServiceActivity(component_code="b", id="same"))

    with pytest.raises(ValueError, match="two elements share the id 'same'"):
        build_tree(start)


def test_tree_must_start_with_a_start_event() -> None:
    with pytest.raises(TypeError, match="EmptyStartEvent"):
        build_tree(ServiceActivity(component_code="a"))  # type: ignore[arg-type]
