"""The whole flow model in the pure core: gateways, subprocesses, loops, variables."""

from __future__ import annotations

from typing import Any

import pytest

from engine_server.core.model import NodeState, PipelineState
from engine_server.core.tree import TreeError, parse_tree
from tests.flows import act, exclusive_tree, loop_tree, subprocess_tree
from tests.unit.flow_sim import Simulation
from worker_sdk.builder import (
    ConditionalParallelGateway,
    ConvergeGateway,
    Data,
    EmptyEndEvent,
    EmptyStartEvent,
    ExclusiveGateway,
    ExecutableEndEvent,
    NodeOutput,
    ParallelGateway,
    RewritableNodeOutput,
    ServiceActivity,
    SubProcess,
    Var,
    build_tree,
)

FINISHED, FAILED = NodeState.FINISHED, NodeState.FAILED


def echo(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if not k.startswith("_")}


def boom(inputs: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("boom")


def count(inputs: dict[str, Any]) -> dict[str, Any]:
    return {"next": inputs.get("i", 0) + 1, "value": inputs.get("value")}


COMPONENTS = {"emit": echo, "boom": boom, "count": count}


def test_parallel_gateway_with_ten_branches_runs_every_branch_and_joins() -> None:
    start, pg, cg, end = EmptyStartEvent(), ParallelGateway(), ConvergeGateway(), EmptyEndEvent()
    branches = [act() for _ in range(10)]
    for branch in branches[:3]:
        branch.extend(act())  # some branches are two nodes long
    start.extend(pg).connect(*branches).to(pg).converge(cg).extend(end)
    sim = Simulation(build_tree(start), COMPONENTS).run()
    assert sim.state is PipelineState.FINISHED
    assert len(sim.executed) == 13
    assert sim.node_state(cg.id) is FINISHED
    assert sim.snapshot.joins == {}


def test_nested_parallel_inside_parallel() -> None:
    start, outer, outer_join, end = EmptyStartEvent(), ParallelGateway(), ConvergeGateway(), EmptyEndEvent()
    inner, inner_join = ParallelGateway(), ConvergeGateway()
    inner.connect(act(), act(), act()).to(inner).converge(inner_join).extend(act())
    start.extend(outer).connect(inner, act()).to(outer).converge(outer_join).extend(end)
    sim = Simulation(build_tree(start), COMPONENTS).run()
    assert sim.state is PipelineState.FINISHED
    assert len(sim.executed) == 5
    assert sim.node_state(inner_join.id) is FINISHED and sim.node_state(outer_join.id) is FINISHED


def test_exclusive_gateway_takes_the_one_true_branch_and_leaves_the_other_without_state() -> None:
    tree, branches, _ = exclusive_tree({0: '"${name}" == "bob"', 1: '"${name}" != "bob"'})
    sim = Simulation(tree, COMPONENTS).run()
    assert sim.state is PipelineState.FINISHED
    assert sim.node_state(branches[0].id) is FINISHED
    assert sim.node_state(branches[1].id) is None


def test_exclusive_gateway_with_no_true_condition_fails_with_bamboos_message() -> None:
    tree, _, gateway = exclusive_tree({0: "${n} > 5", 1: "${n} < 0"})
    sim = Simulation(tree, COMPONENTS).run()
    assert sim.state is PipelineState.FAILED
    assert sim.node_state(gateway.id) is FAILED
    assert sim.outputs(gateway.id)["ex_data"] == "all conditions of branches are not meet"
    assert sim.executed == []


def test_exclusive_gateway_falls_back_to_the_default_flow() -> None:
    tree, _, _ = exclusive_tree({0: "${n} > 5"}, default=1)
    sim = Simulation(tree, COMPONENTS).run()
    assert sim.state is PipelineState.FINISHED
    assert [inputs.get("branch") for _, inputs in sim.executed] == ["1", None]


def test_exclusive_gateway_with_two_true_conditions_fails() -> None:
    tree, _, gateway = exclusive_tree({0: "${n} > 1", 1: "${n} > 2"})
    sim = Simulation(tree, COMPONENTS).run()
    assert sim.node_state(gateway.id) is FAILED
    assert "more than one condition" in sim.outputs(gateway.id)["ex_data"]


def test_conditional_parallel_runs_the_true_branches_and_joins_them() -> None:
    start, gateway, join, end = EmptyStartEvent(), ConditionalParallelGateway(), ConvergeGateway(), EmptyEndEvent()
    branches = [act(branch=i) for i in range(5)]
    for i in range(5):
        gateway.add_condition(i, f"{i} in (0, 2, 4)")
    start.extend(gateway).connect(*branches).to(gateway).converge(join).extend(end)
    sim = Simulation(build_tree(start), COMPONENTS).run()
    assert sim.state is PipelineState.FINISHED
    assert sorted(inputs["branch"] for _, inputs in sim.executed) == [0, 2, 4]
    assert [sim.node_state(b.id) for b in branches] == [FINISHED, None, FINISHED, None, FINISHED]


def test_a_failed_branch_fails_the_pipeline_only_once_the_other_branches_stopped() -> None:
    start, pg, cg, end = EmptyStartEvent(), ParallelGateway(), ConvergeGateway(), EmptyEndEvent()
    start.extend(pg).connect(act("boom"), act(), act()).to(pg).converge(cg).extend(end)
    sim = Simulation(build_tree(start), COMPONENTS).run()
    assert sim.state is PipelineState.FAILED
    assert len(sim.executed) == 3  # the other branches still ran
    assert sim.node_state(cg.id) is None


def test_subprocess_outputs_reach_the_parent_and_params_fall_back_to_defaults() -> None:
    tree, (sub, *_) = subprocess_tree(depth=2)
    sim = Simulation(tree, COMPONENTS).run()
    assert sim.state is PipelineState.FINISHED
    texts = [inputs["text"] for _, inputs in sim.executed[:2]]
    # Level 1 takes its default; level 2 receives level 1's greeting through params.
    assert texts == ["default 1 from level 1", "default 1 from level 2"]
    # The innermost result travels up through every level's data.outputs.
    assert sim.outputs(sub.id)["${result}"] == "default 1 from level 2"
    assert sim.executed[-1][1]["seen"] == "default 1 from level 2"
    assert sim.snapshot.outputs == {"${from_sub}": "default 1 from level 2"}


def test_subprocess_failure_fails_the_subprocess_node_and_the_pipeline() -> None:
    start = EmptyStartEvent()
    failing = act("boom")
    start.extend(failing).extend(EmptyEndEvent())
    sub = SubProcess(start=start)
    root = EmptyStartEvent()
    root.extend(sub).extend(act()).extend(EmptyEndEvent())
    sim = Simulation(build_tree(root), COMPONENTS).run()
    assert sim.node_state(failing.id) is FAILED
    assert sim.node_state(sub.id) is FAILED
    assert sim.state is PipelineState.FAILED
    assert len(sim.executed) == 1


def test_a_loop_reenters_nodes_keeping_history_until_the_condition_holds() -> None:
    tree, first, _ = loop_tree()
    sim = Simulation(tree, COMPONENTS, cycle_tolerate=True).run()
    assert sim.state is PipelineState.FINISHED
    assert [inputs["value"] for code, inputs in sim.executed if code == "count"] == ["a", "b", "c"]
    assert sim.snapshot.nodes[first.id].loop == 3
    assert len(sim.histories[first.id]) == 2
    assert [run.loop for run in sim.histories[first.id]] == [1, 2]


def test_the_rerun_limit_fails_the_node() -> None:
    tree, first, _ = loop_tree()
    sim = Simulation(
        tree, {"count": lambda inputs: {"next": 0}, "emit": echo}, cycle_tolerate=True, rerun_limit=5
    ).run()
    assert sim.state is PipelineState.FAILED
    assert sim.node_state(first.id) is FAILED
    assert "rerun limit of 5" in sim.outputs(first.id)["ex_data"]


def test_executable_end_event_is_a_task_and_its_failure_fails_the_end() -> None:
    start, end = EmptyStartEvent(), ExecutableEndEvent(type="notify_done")
    start.extend(act()).extend(end)
    tree = build_tree(start)
    ok = Simulation(tree, {"emit": echo, "notify_done": lambda inputs: {"sent": True}}).run()
    assert ok.state is PipelineState.FINISHED
    assert [code for code, _ in ok.executed] == ["emit", "notify_done"]
    bad = Simulation(tree, {"emit": echo, "notify_done": boom}).run()
    assert bad.node_state(end.id) is FAILED
    assert bad.state is PipelineState.FAILED


def test_every_variable_kind_renders_into_one_nodes_inputs() -> None:
    start, producer, consumer, end = EmptyStartEvent(), act(), ServiceActivity(component_code="emit"), EmptyEndEvent()
    producer.component.inputs.v = Var(type=Var.PLAIN, value=7)
    consumer.component.inputs.plain = Var(type=Var.PLAIN, value="${not_rendered}")
    consumer.component.inputs.splice = Var(type=Var.SPLICE, value="${name}-${n + 1}")
    consumer.component.inputs.typed = Var(type=Var.SPLICE, value="${n}")
    consumer.component.inputs.lazy = Var(type=Var.LAZY, value="${name}", custom_type="upper_case")
    consumer.component.inputs.output = Var(type=Var.SPLICE, value="${produced}")
    consumer.component.inputs.nested = Var(type=Var.SPLICE, value={"list": ["${name}", "${n * 2}"]})
    start.extend(producer).extend(consumer).extend(end)
    data = Data()
    data.inputs["${name}"] = Var(type=Var.PLAIN, value="ada")
    data.inputs["${n}"] = Var(type=Var.PLAIN, value=1)
    data.inputs["${produced}"] = NodeOutput(source_act=producer.id, source_key="v", type=Var.SPLICE, value=None)
    sim = Simulation(build_tree(start, data=data), COMPONENTS).run()
    inputs = sim.executed[1][1]
    assert inputs == {
        "plain": "${not_rendered}",
        "splice": "ada-2",
        "typed": 1,
        "lazy": "ADA",
        "output": 7,
        "nested": {"list": ["ada", 2]},
        "_loop": 1,
        "_inner_loop": 1,
    }


def test_a_rewritable_output_holds_the_latest_writer() -> None:
    start, first, second, third, end = (
        EmptyStartEvent(),
        act(v=1),
        act(v=2, seen="${shared}"),
        act(seen="${shared}"),
        EmptyEndEvent(),
    )
    start.extend(first).extend(second).extend(third).extend(end)
    data = Data()
    data.inputs["${shared}"] = RewritableNodeOutput(
        source_act=[{"source_act": first.id, "source_key": "v"}, {"source_act": second.id, "source_key": "v"}],
        type=Var.SPLICE,
        value=None,
    )
    sim = Simulation(build_tree(start, data=data), COMPONENTS).run()
    assert [inputs.get("seen") for _, inputs in sim.executed] == [None, 1, 2]


@pytest.mark.parametrize("bad", ["unconverged", "condition_on_unknown_flow", "bad_expression"])
def test_structural_problems_name_the_gateway(bad: str) -> None:
    start, end = EmptyStartEvent(), EmptyEndEvent()
    if bad == "unconverged":
        gateway: Any = ParallelGateway()
        left, right = act(), act()
        start.extend(gateway).connect(left, right)
        left.extend(end)
        right.extend(end)  # both branches end without meeting at a converge gateway
        tree = build_tree(start)
        code = "no_converge"
    else:
        gateway = ExclusiveGateway({0: "1 == 1", 1: "1 == 2"})
        join = ConvergeGateway()
        start.extend(gateway).connect(act(), act()).to(gateway).converge(join).extend(end)
        tree = build_tree(start)
        node = tree["gateways"][gateway.id]
        flow = next(iter(node["conditions"]))
        if bad == "condition_on_unknown_flow":
            node["conditions"]["nope"] = node["conditions"].pop(flow)
            code = "condition_on_unknown_flow"
        else:
            node["conditions"][flow]["evaluate"] = "1 == == 2"
            code = "bad_expression"
    with pytest.raises(TreeError) as raised:
        parse_tree(tree)
    problems = [p for p in raised.value.problems if p.code == code]
    assert problems and problems[0].node_id == gateway.id, raised.value.problems


def test_pre_render_keys_fix_a_splice_at_start_while_others_render_on_use() -> None:
    start, producer, reader, end = EmptyStartEvent(), act(v="changed"), act(), EmptyEndEvent()
    reader.component.inputs.fixed = Var(type=Var.SPLICE, value="${fixed}")
    reader.component.inputs.live = Var(type=Var.SPLICE, value="${live}")
    start.extend(producer).extend(reader).extend(end)
    variables = Data()
    variables.inputs["${source}"] = NodeOutput(source_act=producer.id, source_key="v", type=Var.SPLICE, value="initial")
    variables.inputs["${fixed}"] = Var(type=Var.SPLICE, value="${source}!")
    variables.inputs["${live}"] = Var(type=Var.SPLICE, value="${source}!")
    variables.pre_render_keys = ["${fixed}"]
    sim = Simulation(build_tree(start, data=variables), COMPONENTS).run()
    inputs = sim.executed[1][1]
    assert (inputs["fixed"], inputs["live"]) == ("initial!", "changed!")
