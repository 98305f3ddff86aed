"""The whole flow model end to end: a real server (SQLite and PostgreSQL), real worker processes.

One server and one worker process serve the whole module; every test starts its own pipelines.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.flows import act, data, exclusive_tree, loop_tree, subprocess_tree
from tests.support.module_engine import Engine, find, flat_states, module_engine
from worker_sdk import InvalidArgument
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

RERUN_LIMIT = 8
CODES = ["emit", "count", "boom", "notify_end", "failing_end"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    yield from module_engine(request, tmp_path_factory, CODES, ["--rerun-limit", str(RERUN_LIMIT)])


# ---------------------------------------------------------------- parallel gateways


def test_parallel_gateway_with_ten_branches(engine: Engine) -> None:
    start, fork, join, end = EmptyStartEvent(), ParallelGateway(), ConvergeGateway(), EmptyEndEvent()
    branches = [act(branch=i) for i in range(10)]
    seconds = [branch.extend(act(branch=f"{i}b")) for i, branch in enumerate(branches[:4])]
    start.extend(fork).connect(*branches).to(fork).converge(join).extend(end)
    pipeline_id, state = engine.run(build_tree(start))
    assert state["state"] == "FINISHED"
    states = flat_states(state)
    assert len(states) == 1 + 1 + 10 + 4 + 1 + 1
    assert set(states.values()) == {"FINISHED"}
    assert {e["inputs"]["branch"] for e in engine.executions(pipeline_id)} == {*range(10), "0b", "1b", "2b", "3b"}
    assert engine.outputs(pipeline_id, seconds[0].id)["branch"] == "0b"


def test_nested_parallel_inside_parallel(engine: Engine) -> None:
    start, outer, outer_join, end = EmptyStartEvent(), ParallelGateway(), ConvergeGateway(), EmptyEndEvent()
    inner, inner_join = ParallelGateway(), ConvergeGateway()
    after_inner = act(step="after inner")
    inner.connect(act(step=1), act(step=2), act(step=3)).to(inner).converge(inner_join).extend(after_inner)
    start.extend(outer).connect(inner, act(step="side")).to(outer).converge(outer_join).extend(end)
    pipeline_id, state = engine.run(build_tree(start))
    assert state["state"] == "FINISHED"
    assert {s for s in flat_states(state).values()} == {"FINISHED"}
    executed = [e["inputs"]["step"] for e in engine.executions(pipeline_id)]
    assert sorted(map(str, executed)) == ["1", "2", "3", "after inner", "side"]
    assert executed.index("after inner") > max(executed.index(1), executed.index(2), executed.index(3))


# ---------------------------------------------------------------- exclusive gateways


def test_exclusive_takes_the_first_branch_when_its_condition_holds(engine: Engine) -> None:
    tree, branches, gateway = exclusive_tree({0: "${n} == 3", 1: "${n} != 3"})
    pipeline_id, state = engine.run(tree)
    states = flat_states(state)
    assert state["state"] == "FINISHED"
    assert states[branches[0].id] == "FINISHED"
    assert branches[1].id not in states  # the branch not taken has no state


def test_exclusive_compares_quoted_strings_of_pipeline_variables(engine: Engine) -> None:
    tree, branches, _ = exclusive_tree({0: '"${name}" == "alice"', 1: '"${name}" == "bob"'})
    pipeline_id, state = engine.run(tree)
    states = flat_states(state)
    assert (states.get(branches[0].id), states[branches[1].id]) == (None, "FINISHED")
    # A preset given at Start replaces the tree's value.
    pipeline_id, state = engine.run(tree, {"name": "alice"})
    states = flat_states(state)
    assert (states[branches[0].id], states.get(branches[1].id)) == ("FINISHED", None)


def test_exclusive_with_no_true_condition_fails_and_runs_nothing_downstream(engine: Engine) -> None:
    tree, branches, gateway = exclusive_tree({0: "${n} > 10", 1: "${n} < 0"})
    pipeline_id, state = engine.run(tree)
    states = flat_states(state)
    assert state["state"] == "FAILED"
    assert states[gateway.id] == "FAILED"
    assert engine.client.get_node_data(pipeline_id, gateway.id)["ex_data"] == "all conditions of branches are not meet"
    assert len(states) == 2  # start and the gateway: nothing after it
    assert engine.executions(pipeline_id) == []


def test_exclusive_with_no_true_condition_takes_the_default_flow(engine: Engine) -> None:
    tree, branches, _ = exclusive_tree({0: "${n} > 10"}, default=1)
    pipeline_id, state = engine.run(tree)
    states = flat_states(state)
    assert state["state"] == "FINISHED"
    assert (states.get(branches[0].id), states[branches[1].id]) == (None, "FINISHED")


def test_nested_exclusive_gateways(engine: Engine) -> None:
    start, end = EmptyStartEvent(), EmptyEndEvent()
    outer, outer_join = ExclusiveGateway({0: "${n} > 1", 1: "${n} <= 1"}), ConvergeGateway()
    inner, inner_join = ExclusiveGateway({0: "${n} == 2", 1: "${n} == 3"}), ConvergeGateway()
    two, three, small = act(pick="two"), act(pick="three"), act(pick="small")
    inner.connect(two, three).to(inner).converge(inner_join)
    start.extend(outer).connect(inner, small)
    inner_join.extend(outer_join)
    small.extend(outer_join)
    outer_join.extend(end)
    pipeline_id, state = engine.run(build_tree(start, data=data(n=3)))
    states = flat_states(state)
    assert state["state"] == "FINISHED"
    assert [e["inputs"]["pick"] for e in engine.executions(pipeline_id)] == ["three"]
    assert two.id not in states and small.id not in states


# ---------------------------------------------------------------- conditional parallel gateways


def conditional_tree(
    conditions: dict[int, str], default: int | None = None, width: int = 5
) -> tuple[Any, list[Any], Any]:
    start, join, end = EmptyStartEvent(), ConvergeGateway(), EmptyEndEvent()
    gateway = ConditionalParallelGateway(conditions, default)
    branches = [act(branch=i) for i in range(width)]
    start.extend(gateway).connect(*branches).to(gateway).converge(join).extend(act(step="after")).extend(end)
    return build_tree(start, data=data(name="bob", n=3)), branches, gateway


def test_conditional_parallel_runs_three_of_five_branches(engine: Engine) -> None:
    conditions = {i: f"{i} in (0, 2, 4)" for i in range(5)}
    tree, branches, gateway = conditional_tree(conditions)
    pipeline_id, state = engine.run(tree)
    states = flat_states(state)
    assert state["state"] == "FINISHED"
    assert [states.get(b.id) for b in branches] == ["FINISHED", None, "FINISHED", None, "FINISHED"]
    assert sorted(e["inputs"].get("branch", 99) for e in engine.executions(pipeline_id)) == [0, 2, 4, 99]


def test_conditional_parallel_compares_quoted_strings(engine: Engine) -> None:
    tree, branches, _ = conditional_tree(
        {0: '"${name}" == "bob"', 1: '"${name}" != "bob"', 2: '"x${name}" == "xbob"'}, width=3
    )
    pipeline_id, state = engine.run(tree)
    states = flat_states(state)
    assert [states.get(b.id) for b in branches] == ["FINISHED", None, "FINISHED"]


def test_conditional_parallel_with_no_true_condition_fails(engine: Engine) -> None:
    tree, branches, gateway = conditional_tree({i: "${n} > 100" for i in range(3)}, width=3)
    pipeline_id, state = engine.run(tree)
    states = flat_states(state)
    assert state["state"] == "FAILED"
    assert states[gateway.id] == "FAILED"
    assert engine.client.get_node_data(pipeline_id, gateway.id)["ex_data"] == "all conditions of branches are not meet"
    assert not any(b.id in states for b in branches)


def test_conditional_parallel_with_no_true_condition_takes_the_default(engine: Engine) -> None:
    tree, branches, _ = conditional_tree({0: "${n} > 100", 1: "${n} > 100"}, default=2, width=3)
    pipeline_id, state = engine.run(tree)
    states = flat_states(state)
    assert state["state"] == "FINISHED"
    assert [states.get(b.id) for b in branches] == [None, None, "FINISHED"]


def test_nested_conditional_parallel(engine: Engine) -> None:
    start, end = EmptyStartEvent(), EmptyEndEvent()
    outer, outer_join = ConditionalParallelGateway({0: "1 == 1", 1: "1 == 1", 2: "1 == 2"}), ConvergeGateway()
    inner, inner_join = ConditionalParallelGateway({0: "${n} >= 3", 1: "${n} >= 4"}), ConvergeGateway()
    inner_a, inner_b = act(step="inner a"), act(step="inner b")
    inner.connect(inner_a, inner_b).to(inner).converge(inner_join)
    side, skipped = act(step="side"), act(step="never")
    start.extend(outer).connect(inner, side, skipped)
    inner_join.extend(outer_join)
    side.extend(outer_join)
    skipped.extend(outer_join)
    outer_join.extend(end)
    pipeline_id, state = engine.run(build_tree(start, data=data(n=3)))
    states = flat_states(state)
    assert state["state"] == "FINISHED"
    assert sorted(e["inputs"]["step"] for e in engine.executions(pipeline_id)) == ["inner a", "side"]
    assert inner_b.id not in states and skipped.id not in states


# ---------------------------------------------------------------- executable end events


@pytest.mark.parametrize(("code", "expected"), [("notify_end", "FINISHED"), ("failing_end", "FAILED")])
def test_executable_end_event_in_the_root(engine: Engine, code: str, expected: str) -> None:
    start, end = EmptyStartEvent(), ExecutableEndEvent(type=code)
    start.extend(act()).extend(end)
    pipeline_id, state = engine.run(build_tree(start))
    assert state["state"] == expected
    assert flat_states(state)[end.id] == expected
    if expected == "FAILED":
        assert "could not notify" in engine.client.get_node_data(pipeline_id, end.id)["ex_data"]


@pytest.mark.parametrize(("code", "expected"), [("notify_end", "FINISHED"), ("failing_end", "FAILED")])
def test_executable_end_event_in_a_subprocess(engine: Engine, code: str, expected: str) -> None:
    child_start, child_end = EmptyStartEvent(), ExecutableEndEvent(type=code)
    child_start.extend(act()).extend(child_end)
    sub = SubProcess(start=child_start)
    after = act(step="after")
    start = EmptyStartEvent()
    start.extend(sub).extend(after).extend(EmptyEndEvent())
    pipeline_id, state = engine.run(build_tree(start))
    states = flat_states(state)
    assert (states[child_end.id], states[sub.id], state["state"]) == (expected, expected, expected)
    assert (after.id in states) is (expected == "FINISHED")


# ---------------------------------------------------------------- subprocesses


def test_a_subprocess_nests_its_nodes_in_the_state_tree(engine: Engine) -> None:
    tree, (sub, reader, inner) = subprocess_tree(depth=1)
    pipeline_id, state = engine.run(tree)
    assert state["state"] == "FINISHED"
    assert engine.outputs(pipeline_id, reader.id)["seen"] == "default 1 from level 1"  # the output, one level up
    sub_state = state["children"][sub.id]
    assert sub_state["type"] == "SubProcess"
    assert inner.id in sub_state["children"] and inner.id not in state["children"]
    assert sub_state["children"][inner.id]["inner_loop"] == 1


def test_five_subprocesses_in_parallel_plus_one_chained(engine: Engine) -> None:
    def sub(label: str) -> SubProcess:
        child = EmptyStartEvent()
        child.extend(act(label=label)).extend(EmptyEndEvent())
        return SubProcess(start=child)

    start, fork, join, end = EmptyStartEvent(), ParallelGateway(), ConvergeGateway(), EmptyEndEvent()
    subs = [sub(f"p{i}") for i in range(5)]
    chained = sub("chained")
    start.extend(fork).connect(*subs).to(fork).converge(join).extend(chained).extend(end)
    pipeline_id, state = engine.run(build_tree(start))
    assert state["state"] == "FINISHED"
    labels = [e["inputs"]["label"] for e in engine.executions(pipeline_id)]
    assert sorted(labels[:5]) == [f"p{i}" for i in range(5)] and labels[5] == "chained"
    assert all(state["children"][s.id]["state"] == "FINISHED" for s in [*subs, chained])


def test_two_levels_of_nesting_and_outputs_read_by_the_parent(engine: Engine) -> None:
    tree, (outer, reader, level1, level2) = subprocess_tree(depth=2)
    pipeline_id, state = engine.run(tree)
    assert state["state"] == "FINISHED"
    assert find(state, level2.id)["state"] == "FINISHED"
    assert (
        level2.id
        in state["children"][outer.id]["children"][
            next(iter(k for k, v in state["children"][outer.id]["children"].items() if v["type"] == "SubProcess"))
        ]["children"]
    )
    # The innermost activity's output travels up two levels and is read by the root's reader.
    assert engine.outputs(pipeline_id, reader.id)["seen"] == "default 1 from level 2"
    assert engine.outputs(pipeline_id, outer.id)["${result}"] == "default 1 from level 2"
    assert state["outputs"] == {"${from_sub}": "default 1 from level 2"}  # the root's data.outputs


def test_preset_context_is_read_by_splices_at_both_levels(engine: Engine) -> None:
    child = EmptyStartEvent()
    inner = act(text="inner sees ${region}")
    child.extend(inner).extend(EmptyEndEvent())
    sub = SubProcess(start=child)
    outer = act(text="outer sees ${region}")
    start = EmptyStartEvent()
    start.extend(outer).extend(sub).extend(EmptyEndEvent())
    tree = build_tree(start)
    problems = engine.client.validate(tree)
    assert {(p["code"], p["node_id"]) for p in problems} == {
        ("unknown_variable", outer.id),
        ("unknown_variable", inner.id),
    }
    assert all("${region}" in p["message"] for p in problems)
    assert engine.client.validate(tree, {"region": "eu-west"}) == []
    pipeline_id, state = engine.run(tree, {"region": "eu-west"})
    assert state["state"] == "FINISHED"
    assert engine.outputs(pipeline_id, outer.id)["text"] == "outer sees eu-west"
    assert engine.outputs(pipeline_id, inner.id)["text"] == "inner sees eu-west"


# ---------------------------------------------------------------- data


def test_every_variable_kind_in_one_nodes_inputs(engine: Engine) -> None:
    start, producer, end = EmptyStartEvent(), act(v=7), EmptyEndEvent()
    consumer = ServiceActivity(component_code="emit")
    consumer.component.inputs.plain = Var(type=Var.PLAIN, value="${not rendered}")
    consumer.component.inputs.splice = Var(type=Var.SPLICE, value="${name}-${n + 1}")
    consumer.component.inputs.typed = Var(type=Var.SPLICE, value="${n}")
    consumer.component.inputs.lazy = Var(type=Var.LAZY, value="${name}", custom_type="upper_case")
    consumer.component.inputs.output = Var(type=Var.SPLICE, value="${produced}")
    consumer.component.inputs.rewritable = Var(type=Var.SPLICE, value="${latest}")
    consumer.component.inputs.nested = Var(
        type=Var.SPLICE, value={"list": ["${name}", "${n * 2}"], "k": "${name.upper()}"}
    )
    start.extend(producer).extend(consumer).extend(end)
    variables = data(name="ada", n=1)
    variables.inputs["${produced}"] = NodeOutput(source_act=producer.id, source_key="v", type=Var.SPLICE, value=None)
    variables.inputs["${latest}"] = RewritableNodeOutput(
        source_act=[{"source_act": producer.id, "source_key": "v"}], type=Var.SPLICE, value=None
    )
    pipeline_id, state = engine.run(build_tree(start, data=variables))
    assert state["state"] == "FINISHED"
    assert engine.client.get_node_data(pipeline_id, consumer.id)["inputs"] == {
        "plain": "${not rendered}",
        "splice": "ada-2",
        "typed": 1,
        "lazy": "ADA",
        "output": 7,
        "rewritable": 7,
        "nested": {"list": ["ada", 2], "k": "ADA"},
        "_loop": 1,
        "_inner_loop": 1,
    }


def test_a_rewritable_output_is_seen_first_then_second(engine: Engine) -> None:
    start, end = EmptyStartEvent(), EmptyEndEvent()
    first, second, third = act(v="first"), act(v="second", seen="${shared}"), act(seen="${shared}")
    start.extend(first).extend(second).extend(third).extend(end)
    variables = Data()
    variables.inputs["${shared}"] = RewritableNodeOutput(
        source_act=[{"source_act": first.id, "source_key": "v"}, {"source_act": second.id, "source_key": "v"}],
        type=Var.SPLICE,
        value=None,
    )
    pipeline_id, state = engine.run(build_tree(start, data=variables))
    assert engine.outputs(pipeline_id, second.id)["seen"] == "first"
    assert engine.outputs(pipeline_id, third.id)["seen"] == "second"


def test_subprocess_params_override_use_splice_and_fall_back_through_three_levels(engine: Engine) -> None:
    """Three levels define ${key}; the middle level is given a spliced param, the innermost falls back."""

    def level(label: str, inner: Any, params: dict[str, Any]) -> SubProcess:
        child = EmptyStartEvent()
        chain: Any = child.extend(act(text=f"{label}: ${{key}}"))
        if inner is not None:
            chain = chain.extend(inner)
        chain.extend(EmptyEndEvent())
        variables = Data()
        variables.inputs["${key}"] = DataInput(type=Var.PLAIN, value=f"{label} default")
        return SubProcess(start=child, data=variables, params=Params(params))

    innermost = level("level 3", None, {})
    middle = level("level 2", innermost, {})
    outer = level("level 1", middle, {"${key}": Var(type=Var.SPLICE, value="${key} via param")})
    start = EmptyStartEvent()
    start.extend(act(text="root: ${key}")).extend(outer).extend(EmptyEndEvent())
    pipeline_id, state = engine.run(build_tree(start, data=data(key="root value")))
    assert state["state"] == "FINISHED"
    texts = [e["inputs"]["text"] for e in engine.executions(pipeline_id)]
    assert texts == [
        "root: root value",
        "level 1: root value via param",
        "level 2: level 2 default",
        "level 3: level 3 default",
    ]


# ---------------------------------------------------------------- loops


def test_a_node_pair_loops_until_the_condition_holds(engine: Engine) -> None:
    tree, first, second = loop_tree()
    tree_data = tree["data"]["inputs"]
    tree_data["${c}"]["value"] = 4
    pipeline_id, state = engine.run(tree, cycle_tolerate=True)
    assert state["state"] == "FINISHED"
    for node in (first, second):
        assert state["children"][node.id]["loop"] == 4
        histories = engine.client.get_node_histories(pipeline_id, node.id)
        assert [h["loop"] for h in histories] == [1, 2, 3]
        assert len({h["version"] for h in histories} | {state["children"][node.id]["version"]}) == 4
    values = [e["value"] for e in engine.executions(pipeline_id) if "value" in e]
    assert values == ["a", "b", "c", "d"]
    assert [h["inputs"]["value"] for h in engine.client.get_node_histories(pipeline_id, first.id)] == ["a", "b", "c"]


def test_a_loop_through_a_subprocess(engine: Engine) -> None:
    child = EmptyStartEvent()
    inner = act(step="inner")
    child.extend(inner).extend(EmptyEndEvent())
    sub = SubProcess(start=child)
    start, end = EmptyStartEvent(), EmptyEndEvent()
    counter = act("count", i="${a_i}")
    gateway = ExclusiveGateway({0: "${a_i} >= 4", 1: "${a_i} < 4"})
    start.extend(sub).extend(counter).extend(gateway).connect(end, sub)
    variables = Data()
    variables.inputs["${a_i}"] = NodeOutput(source_act=counter.id, source_key="next", type=Var.SPLICE, value=0)
    pipeline_id, state = engine.run(build_tree(start, data=variables), cycle_tolerate=True)
    assert state["state"] == "FINISHED"
    inner_outputs = engine.outputs(pipeline_id, inner.id)
    assert (inner_outputs["seen_loop"], inner_outputs["seen_inner_loop"]) == (4, 1)
    assert state["children"][sub.id]["loop"] == 4


def test_a_loop_around_a_parallel_gateway(engine: Engine) -> None:
    start, end = EmptyStartEvent(), EmptyEndEvent()
    fork, join = ParallelGateway(), ConvergeGateway()
    left, right = act(side="left"), act(side="right")
    counter = act("count", i="${a_i}")
    gateway = ExclusiveGateway({0: "${a_i} >= 3", 1: "${a_i} < 3"})
    start.extend(fork).connect(left, right).to(fork).converge(join).extend(counter).extend(gateway).connect(end, fork)
    variables = Data()
    variables.inputs["${a_i}"] = NodeOutput(source_act=counter.id, source_key="next", type=Var.SPLICE, value=0)
    pipeline_id, state = engine.run(build_tree(start, data=variables), cycle_tolerate=True)
    assert state["state"] == "FINISHED"
    assert state["children"][join.id]["loop"] == 3
    assert [state["children"][n.id]["loop"] for n in (left, right, counter)] == [3, 3, 3]


def test_a_loop_inside_one_parallel_branch(engine: Engine) -> None:
    start, end = EmptyStartEvent(), EmptyEndEvent()
    fork, join = ParallelGateway(), ConvergeGateway()
    counter = act("count", i="${a_i}")
    gateway = ExclusiveGateway({0: "${a_i} >= 3", 1: "${a_i} < 3"})
    other = act(side="other")
    start.extend(fork).connect(counter, other)
    counter.extend(gateway).connect(join, counter)
    other.extend(join)
    join.extend(end)
    variables = Data()
    variables.inputs["${a_i}"] = NodeOutput(source_act=counter.id, source_key="next", type=Var.SPLICE, value=0)
    pipeline_id, state = engine.run(build_tree(start, data=variables), cycle_tolerate=True)
    assert state["state"] == "FINISHED"
    assert state["children"][counter.id]["loop"] == 3
    assert state["children"][other.id]["loop"] == 1
    assert state["children"][join.id]["loop"] == 1


def test_the_rerun_limit_fails_the_node(engine: Engine) -> None:
    start, end = EmptyStartEvent(), EmptyEndEvent()
    spinner = act(i=0)
    gateway = ExclusiveGateway({0: "1 == 2", 1: "1 == 1"})
    start.extend(spinner).extend(gateway).connect(end, spinner)
    pipeline_id, state = engine.run(build_tree(start), cycle_tolerate=True)
    assert state["state"] == "FAILED"
    assert state["children"][spinner.id]["state"] == "FAILED"
    assert f"over the rerun limit of {RERUN_LIMIT}" in engine.client.get_node_data(pipeline_id, spinner.id)["ex_data"]
    assert len(engine.client.get_node_histories(pipeline_id, spinner.id)) == RERUN_LIMIT


def test_cycles_need_cycle_tolerate(engine: Engine) -> None:
    tree, first, _ = loop_tree()
    with pytest.raises(InvalidArgument, match="cycle_tolerate"):
        engine.client.start(tree)


# ---------------------------------------------------------------- expression safety

HOSTILE = [
    "().__class__.__bases__[0].__subclasses__()",
    "x.__class__",
    "__import__('os').system('true')",
    "open('/etc/passwd').read()",
    "eval('1')",
    "exec('x = 1')",
    "getattr(x, '__class__')",
    "(lambda: 1)()",
    "[y for y in range(10**9)]",
    "(y for y in x)",
    "9**9**9",
    "2**100000",
    "10**10**10",
    "'a' * 10**9",
    "[1] * 10**8",
    "'a' * 100000 * 100000",
    "(" * 500 + "1" + ")" * 500,
    "-" * 1000 + "1",
    "1" * 10000,
    "'%s' % x",
    "'{0.__class__}'.format(x)",
    "f'{x}'",
    "(y := 1)",
    "[*x]",
    "x.mro",
    "().__reduce_ex__(2)",
    "'x'.encode()",
    "globals()",
    "locals()",
    "vars()",
    "dir()",
    "type(x)",
    "breakpoint()",
    "sorted(range(10**8))",
    "x.split(',') * 10**7",
]


@pytest.mark.parametrize("expression", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_expressions_are_refused_or_bounded_and_the_server_stays_up(engine: Engine, expression: str) -> None:
    start, node, end = EmptyStartEvent(), act(value="${" + expression + "}"), EmptyEndEvent()
    start.extend(node).extend(end)
    tree = build_tree(start, data=data(x="a,b"))
    try:
        pipeline_id, state = engine.run(tree)
    except InvalidArgument as refused:  # refused when the tree is read
        assert "${" + expression[:20] in refused.message, refused.message  # the message quotes the expression
    else:  # or bounded while rendering: the node fails naming the limit, no worker ever sees it
        ex_data = engine.client.get_node_data(pipeline_id, node.id)["ex_data"]
        assert (state["state"], state["children"][node.id]["state"]) == ("FAILED", "FAILED")
        assert ex_data.startswith("cannot render") and "MAX_" in ex_data, ex_data
        assert engine.executions(pipeline_id) == []
    # The server keeps serving.
    healthy = act(ok=True)
    start = EmptyStartEvent()
    start.extend(healthy).extend(EmptyEndEvent())
    assert engine.run(build_tree(start))[1]["state"] == "FINISHED"
