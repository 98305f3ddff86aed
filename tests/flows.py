"""Pipeline shapes built with the SDK builder, shared by the core's unit tests and the end-to-end tests."""

from __future__ import annotations

from typing import Any

from worker_sdk.builder import (
    ConvergeGateway,
    Data,
    DataInput,
    EmptyEndEvent,
    EmptyStartEvent,
    ExclusiveGateway,
    NodeOutput,
    Params,
    ServiceActivity,
    SubProcess,
    Var,
    build_tree,
)


def act(code: str = "emit", name: str | None = None, **inputs: Any) -> ServiceActivity:
    """An activity whose inputs are plain values, or splices when they contain ${...}."""
    node = ServiceActivity(component_code=code, name=name)
    for key, value in inputs.items():
        kind = Var.SPLICE if "${" in repr(value) else Var.PLAIN
        setattr(node.component.inputs, key, Var(type=kind, value=value))
    return node


def data(**variables: Any) -> Data:
    result = Data()
    for key, value in variables.items():
        result.inputs[f"${{{key}}}"] = value if isinstance(value, Var) else Var(type=Var.PLAIN, value=value)
    return result


def exclusive_tree(conditions: dict[int, str], default: int | None = None) -> tuple[dict[str, Any], list[Any], Any]:
    """start -> exclusive(2 branches, each one activity) -> converge -> end, with ${name}="bob", ${n}=3."""
    start, join, end = EmptyStartEvent(), ConvergeGateway(), EmptyEndEvent()
    gateway = ExclusiveGateway(conditions, default)
    branches = [act(branch=str(i)) for i in range(2)]
    start.extend(gateway).connect(*branches).to(gateway).converge(join).extend(act(after="join")).extend(end)
    return build_tree(start, data=data(name="bob", n=3)), branches, gateway


def loop_tree(code: str = "count") -> tuple[dict[str, Any], Any, Any]:
    """first -> second -> exclusive: back to first while ${a_i} < ${c}, else end. ${a_i} is first's `next`."""
    start, end = EmptyStartEvent(), EmptyEndEvent()
    first = act(code, value='${l.split(",")[a_i]}', i="${a_i}")
    second = act("emit", i="${a_i}")
    gateway = ExclusiveGateway({0: "${a_i} >= ${c}", 1: "${a_i} < ${c}"})
    start.extend(first).extend(second).extend(gateway).connect(end, first)
    variables = data(l="a,b,c,d,e", c=3)
    variables.inputs["${a_i}"] = NodeOutput(source_act=first.id, source_key="next", type=Var.SPLICE, value=0)
    return build_tree(start, data=variables), first, second


def subprocess_tree(depth: int) -> tuple[dict[str, Any], list[Any]]:
    """Nested subprocesses, each with an activity that renders `${greeting}` and hands `${result}` up.

    Returns the tree and [outermost subprocess, the root's reader activity, inner activities outermost first].
    """
    inner_nodes: list[Any] = []
    child: Any = None
    for level in range(depth, 0, -1):
        start = EmptyStartEvent()
        node = act(text="${greeting} from level " + str(level))
        inner_nodes.insert(0, node)
        chain: Any = start.extend(node)
        if child is not None:
            chain = chain.extend(child)
        chain.extend(EmptyEndEvent())
        level_data = Data()
        level_data.inputs["${greeting}"] = DataInput(type=Var.PLAIN, value=f"default {level}")
        source, key = (node, "text") if child is None else (child, "${result}")
        level_data.inputs["${result}"] = NodeOutput(source_act=source.id, source_key=key, type=Var.SPLICE, value=None)
        level_data.outputs = ["${result}"]
        params = Params({"${greeting}": Var(type=Var.SPLICE, value="${greeting}")}) if level > 1 else Params()
        child = SubProcess(start=start, data=level_data, params=params)
    root_start = EmptyStartEvent()
    reader = act(seen="${from_sub}")
    root_start.extend(child).extend(reader).extend(EmptyEndEvent())
    root_data = Data()
    root_data.inputs["${from_sub}"] = NodeOutput(
        source_act=child.id, source_key="${result}", type=Var.SPLICE, value=None
    )
    root_data.outputs = ["${from_sub}"]
    return build_tree(root_start, data=root_data), [child, reader, *inner_nodes]
