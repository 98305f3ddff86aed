"""Tree parsing and validation: every malformed tree is refused with a problem naming the node or flow."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from engine_server.core.model import NodeType
from engine_server.core.tree import TreeError, check_variables, load_tree_json, parse_tree
from tests.trees import chain_tree


def problems(tree: Any, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(TreeError) as raised:
        parse_tree(tree, **kwargs)
    return [(p.code, p.message) for p in raised.value.problems]


def test_a_valid_chain_parses_with_its_components_and_inputs() -> None:
    tree = chain_tree(["echo", "sum"], inputs={"x": {"type": "plain", "value": 1}})
    spec = parse_tree(tree)
    assert spec.start_event_id == "start"
    assert spec.end_event_id == "end"
    assert spec.nodes["a1"].type is NodeType.SERVICE_ACTIVITY
    assert spec.nodes["a1"].component_code == "sum"
    assert spec.nodes["a0"].inputs["x"].value == 1
    assert spec.next_node_ids("a0") == ["a1"]


def test_single_flows_may_be_strings_or_lists() -> None:
    tree = chain_tree(["echo"])
    tree["activities"]["a0"]["incoming"] = "f0"
    tree["end_event"]["incoming"] = "f1"
    assert parse_tree(tree).nodes["a0"].incoming == ("f0",)


def _without_start() -> dict[str, Any]:
    tree = chain_tree(["echo"])
    del tree["start_event"]
    return tree


def _dangling_flow() -> dict[str, Any]:
    tree = chain_tree(["echo"])
    tree["flows"]["f1"]["target"] = "nowhere"
    return tree


def _unreachable() -> dict[str, Any]:
    tree = chain_tree(["echo", "echo"])
    # a1 is cut off: the start's path goes a0 -> end directly.
    tree["flows"]["f1"]["target"] = "end"
    tree["end_event"]["incoming"] = ["f1", "f2"]
    tree["activities"]["a1"]["incoming"] = []
    tree["flows"]["fx"] = {"id": "fx", "source": "a1", "target": "end", "is_default": False}
    tree["activities"]["a1"]["outgoing"] = "fx"
    tree["end_event"]["incoming"] = ["f1", "fx"]
    del tree["flows"]["f2"]
    return tree


def _duplicate_node_and_flow_id() -> dict[str, Any]:
    tree = chain_tree(["echo"])
    tree["flows"]["a0"] = {"id": "a0", "source": "a0", "target": "end", "is_default": False}
    return tree


def _node_with_unknown_type() -> dict[str, Any]:
    tree = chain_tree(["echo"])
    tree["activities"]["a0"]["type"] = "MagicActivity"
    return tree


def _activity_without_component() -> dict[str, Any]:
    tree = chain_tree(["echo"])
    del tree["activities"]["a0"]["component"]
    return tree


def _undefined_variable() -> dict[str, Any]:
    return chain_tree(["echo"], inputs={"x": {"type": "splice", "value": "hello ${who}"}})


def _cycle() -> dict[str, Any]:
    tree = chain_tree(["echo", "echo"])
    tree["flows"]["back"] = {"id": "back", "source": "a1", "target": "a0", "is_default": False}
    tree["activities"]["a1"]["outgoing"] = "back"
    tree["activities"]["a0"]["incoming"] = ["f0", "back"]
    tree["end_event"]["incoming"] = []
    del tree["flows"]["f2"]
    return tree


@pytest.mark.parametrize(
    ("tree", "code", "named"),
    [
        ([], "not_an_object", "JSON object"),
        (_without_start(), "no_start_event", "no start event"),
        (_dangling_flow(), "dangling_flow", "'nowhere'"),
        (_unreachable(), "unreachable_node", "'a1'"),
        (_duplicate_node_and_flow_id(), "duplicate_id", "'a0'"),
        (_node_with_unknown_type(), "unknown_node_type", "'MagicActivity'"),
        (_activity_without_component(), "no_component", "'a0'"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_malformed_trees_are_refused_naming_the_problem(tree: Any, code: str, named: str) -> None:
    found = problems(tree)
    assert any(c == code and named in message for c, message in found), found


def test_variables_an_expression_uses_must_be_defined_or_preset() -> None:
    spec = parse_tree(_undefined_variable())
    [problem] = check_variables(spec)
    assert problem.code == "unknown_variable"
    assert "${who}" in problem.message and "'a0'" in problem.message
    assert check_variables(spec, ["who"]) == []


def test_a_cycle_is_refused_unless_tolerated_and_the_message_says_how() -> None:
    found = problems(_cycle())
    assert any(code == "cycle" and "cycle_tolerate" in message for code, message in found)


def test_duplicate_ids_in_the_json_text_are_caught_before_json_drops_one() -> None:
    text = '{"activities": {"a1": {"id": "a1"}, "a1": {"id": "a1"}}}'
    with pytest.raises(TreeError) as raised:
        load_tree_json(text)
    assert raised.value.problems[0].code == "duplicate_id"
    assert "'a1'" in raised.value.problems[0].message


def test_text_that_is_not_json_is_refused() -> None:
    with pytest.raises(TreeError) as raised:
        load_tree_json("{not json")
    assert raised.value.problems[0].code == "not_json"


def test_every_problem_is_reported_not_just_the_first() -> None:
    tree = chain_tree(["echo", "echo"])
    del tree["activities"]["a0"]["component"]
    del tree["activities"]["a1"]["component"]
    found = problems(copy.deepcopy(tree))
    assert [c for c, _ in found].count("no_component") == 2


def test_json_nested_too_deeply_is_refused_not_crashed_on() -> None:
    with pytest.raises(TreeError) as raised:
        load_tree_json("[" * 200_000)
    assert raised.value.problems[0].code == "too_deep"


def test_subprocesses_nested_too_deeply_are_refused_not_crashed_on() -> None:
    tree: dict[str, Any] = {}
    for level in range(3000):
        start, node, end = f"s{level}", f"p{level}", f"e{level}"
        inner = {"type": "ServiceActivity", "component": {"code": "echo", "inputs": {}}} if level == 0 else {}
        tree = {
            "id": f"t{level}",
            "start_event": {"id": start, "type": "EmptyStartEvent", "incoming": "", "outgoing": f"{start}f"},
            "end_event": {"id": end, "type": "EmptyEndEvent", "incoming": f"{node}f", "outgoing": ""},
            "activities": {
                node: {"id": node, "incoming": f"{start}f", "outgoing": f"{node}f"}
                | (inner or {"type": "SubProcess", "pipeline": tree})
            },
            "gateways": {},
            "flows": {
                f"{start}f": {"id": f"{start}f", "source": start, "target": node, "is_default": False},
                f"{node}f": {"id": f"{node}f", "source": node, "target": end, "is_default": False},
            },
            "data": {"inputs": {}, "outputs": []},
        }
    with pytest.raises(TreeError) as raised:
        parse_tree(tree)
    assert raised.value.problems[0].code == "too_deep"


def test_hundreds_of_parallel_blocks_in_a_row_each_find_their_converge() -> None:
    blocks = 400  # the converge finder recursed once per block before: over 300 hit Python's recursion limit
    activities: dict[str, Any] = {}
    gateways: dict[str, Any] = {}
    flows: dict[str, Any] = {}

    def flow(source: str, target: str) -> str:
        flow_id = f"f{len(flows)}"
        flows[flow_id] = {"id": flow_id, "source": source, "target": target, "is_default": False}
        return flow_id

    previous = "start"
    outgoing: dict[str, list[str]] = {"start": []}
    incoming: dict[str, list[str]] = {}
    for block in range(blocks):
        fork, join = f"fork{block}", f"join{block}"
        for node in (fork, join, f"a{block}", f"b{block}"):
            outgoing.setdefault(node, [])
        edges = [(previous, fork), (fork, f"a{block}"), (fork, f"b{block}"), (f"a{block}", join), (f"b{block}", join)]
        for source, target in edges:
            flow_id = flow(source, target)
            outgoing[source].append(flow_id)
            incoming.setdefault(target, []).append(flow_id)
        previous = join
    last = flow(previous, "end")
    outgoing[previous].append(last)
    incoming["end"] = [last]
    for block in range(blocks):
        gateways[f"fork{block}"] = {"type": "ParallelGateway", "id": f"fork{block}"}
        gateways[f"join{block}"] = {"type": "ConvergeGateway", "id": f"join{block}"}
        for name in (f"a{block}", f"b{block}"):
            activities[name] = {"type": "ServiceActivity", "id": name, "component": {"code": "echo", "inputs": {}}}
    for node_id, node in {**activities, **gateways}.items():
        node["incoming"] = incoming[node_id]
        node["outgoing"] = outgoing[node_id] if len(outgoing[node_id]) > 1 else outgoing[node_id][0]
    tree = {
        "id": "blocks",
        "start_event": {"id": "start", "type": "EmptyStartEvent", "incoming": "", "outgoing": outgoing["start"][0]},
        "end_event": {"id": "end", "type": "EmptyEndEvent", "incoming": incoming["end"], "outgoing": ""},
        "activities": activities,
        "gateways": gateways,
        "flows": flows,
        "data": {"inputs": {}, "outputs": []},
    }
    spec = parse_tree(tree)
    assert spec.index is not None
    converges = {fork: spec.index.converge_of[fork] for fork in (f"fork{block}" for block in range(blocks))}
    assert converges == {f"fork{block}": f"join{block}" for block in range(blocks)}
