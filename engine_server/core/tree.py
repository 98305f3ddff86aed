"""Parsing and validation of bamboo-engine pipeline trees.

`parse_tree` turns the JSON layout into a `PipelineSpec`, or raises `TreeError` listing every problem
found, each naming the node or flow it is about. It never raises anything else for bad input.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from engine_server.core.model import FlowSpec, NodeSpec, NodeType, PipelineSpec, VarSpec
from engine_server.core.render import splice_references

# Node types this version of the engine runs. The others parse, then are refused as not supported yet.
RUNNABLE_NODE_TYPES = frozenset({NodeType.EMPTY_START_EVENT, NodeType.EMPTY_END_EVENT, NodeType.SERVICE_ACTIVITY})
VARIABLE_TYPES = frozenset({"plain", "splice", "lazy"})


@dataclass(frozen=True, slots=True)
class Problem:
    code: str
    message: str
    node_id: str = ""
    flow_id: str = ""

    @property
    def unsupported(self) -> bool:
        """The tree is valid bamboo, but uses something this engine does not run yet."""
        return self.code.startswith("unsupported_")


class TreeError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        shown = "; ".join(p.message for p in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        super().__init__(f"invalid pipeline tree: {shown}{more}")

    @property
    def unsupported_only(self) -> bool:
        return all(p.unsupported for p in self.problems)


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def load_tree_json(text: str | bytes) -> Any:
    """Parses tree JSON, refusing duplicate keys (JSON would silently keep the last node of an id)."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise TreeError([Problem("duplicate_id", f"duplicate id {exc.args[0]!r} in the tree JSON")]) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TreeError([Problem("not_json", f"the tree is not valid JSON: {exc}")]) from None


def parse_tree(raw: Any, *, cycle_tolerate: bool = False) -> PipelineSpec:
    """Parses and validates a tree (already decoded from JSON)."""
    parser = _TreeParser(raw)
    spec = parser.parse()
    if spec is not None and not parser.problems:
        _check_graph(spec, parser.problems, cycle_tolerate=cycle_tolerate)
        _check_variables(spec, parser.problems)
    if parser.problems or spec is None:
        raise TreeError(parser.problems)
    return spec


def _as_id_list(value: Any) -> tuple[str, ...] | None:
    """bamboo writes a single incoming/outgoing flow as a string, several as a list, none as ""."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    return None


class _TreeParser:
    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.problems: list[Problem] = []

    def problem(self, code: str, message: str, *, node_id: str = "", flow_id: str = "") -> None:
        self.problems.append(Problem(code, message, node_id, flow_id))

    def parse(self) -> PipelineSpec | None:
        raw = self.raw
        if not isinstance(raw, dict):
            self.problem("not_an_object", f"the tree must be a JSON object, not {type(raw).__name__}")
            return None
        tree_id = raw.get("id", "")
        if not isinstance(tree_id, str):
            self.problem("bad_field", "the tree's 'id' must be a string")
            tree_id = ""
        nodes: dict[str, NodeSpec] = {}
        start = self._parse_event(raw, "start_event", NodeType.EMPTY_START_EVENT, nodes)
        end = self._parse_event(raw, "end_event", NodeType.EMPTY_END_EVENT, nodes)
        for section in ("activities", "gateways"):
            for node in self._section(raw, section):
                self._add_node(node, nodes)
        flows = self._parse_flows(raw)
        inputs, outputs = self._parse_data(raw)
        if start is None or end is None:
            return None
        for flow_id in flows:
            if flow_id in nodes:
                self.problem("duplicate_id", f"id {flow_id!r} is used by a flow and a node", flow_id=flow_id)
        return PipelineSpec(
            id=tree_id,
            start_event_id=start,
            end_event_id=end,
            nodes=nodes,
            flows=flows,
            inputs=inputs,
            outputs=outputs,
        )

    def _section(self, raw: dict[str, Any], name: str) -> Iterable[tuple[str, Any]]:
        section = raw.get(name, {})
        if section is None:
            return []
        if not isinstance(section, dict):
            self.problem("bad_field", f"'{name}' must be an object of id -> node")
            return []
        return section.items()

    def _parse_event(
        self, raw: dict[str, Any], key: str, default_type: NodeType, nodes: dict[str, NodeSpec]
    ) -> str | None:
        event = raw.get(key)
        if not isinstance(event, dict) or not event:
            code = "no_start_event" if key == "start_event" else "no_end_event"
            self.problem(code, f"the tree has no {key.replace('_', ' ')}")
            return None
        node_id = event.get("id")
        if not isinstance(node_id, str) or not node_id:
            self.problem("bad_field", f"the {key.replace('_', ' ')} has no id")
            return None
        self._add_node((node_id, {"type": default_type.value, **event}), nodes, expected_section=key)
        added = nodes.get(node_id)
        if added is not None:
            allowed = (
                {NodeType.EMPTY_START_EVENT}
                if key == "start_event"
                else {NodeType.EMPTY_END_EVENT, NodeType.EXECUTABLE_END_EVENT}
            )
            if added.type not in allowed:
                self.problem(
                    "bad_node_type",
                    f"the {key.replace('_', ' ')} {node_id!r} has type {added.type.value}",
                    node_id=node_id,
                )
        return node_id

    def _add_node(self, item: tuple[str, Any], nodes: dict[str, NodeSpec], *, expected_section: str = "") -> None:
        key, node = item
        if not isinstance(node, dict):
            self.problem("bad_node", f"node {key!r} must be an object", node_id=key)
            return
        node_id = node.get("id", key)
        if node_id != key:
            self.problem("bad_node", f"node {key!r} has a different id {node_id!r}", node_id=key)
            return
        if key in nodes:
            self.problem("duplicate_id", f"node id {key!r} is used more than once", node_id=key)
            return
        type_name = node.get("type")
        try:
            node_type = NodeType(type_name)
        except ValueError:
            self.problem("unknown_node_type", f"node {key!r} has unknown type {type_name!r}", node_id=key)
            return
        if not expected_section and node_type in (NodeType.EMPTY_START_EVENT, NodeType.EMPTY_END_EVENT):
            self.problem(
                "duplicate_start_or_end",
                f"node {key!r} is a {node_type.value}; a tree has exactly one start and one end event",
                node_id=key,
            )
            return
        if node_type not in RUNNABLE_NODE_TYPES:
            self.problem(
                "unsupported_node_type",
                f"node {key!r} has type {node_type.value}, which this engine version does not run yet",
                node_id=key,
            )
        incoming = _as_id_list(node.get("incoming"))
        outgoing = _as_id_list(node.get("outgoing"))
        if incoming is None or outgoing is None:
            self.problem(
                "bad_field",
                f"node {key!r}: incoming/outgoing must be a flow id or a list of them",
                node_id=key,
            )
            return
        spec = NodeSpec(
            id=key,
            type=node_type,
            name=str(node.get("name") or ""),
            incoming=incoming,
            outgoing=outgoing,
            error_ignorable=bool(node.get("error_ignorable", False)),
            skippable=bool(node.get("skippable", True)),
            retryable=bool(node.get("retryable", True)),
        )
        if node_type is NodeType.SERVICE_ACTIVITY:
            spec = self._with_component(spec, node)
        nodes[key] = spec

    def _with_component(self, spec: NodeSpec, node: dict[str, Any]) -> NodeSpec:
        component = node.get("component")
        if not isinstance(component, dict) or not isinstance(component.get("code"), str) or not component["code"]:
            self.problem("no_component", f"activity {spec.id!r} has no component code", node_id=spec.id)
            return spec
        inputs = self._parse_vars(component.get("inputs") or {}, where=f"activity {spec.id!r}", node_id=spec.id)
        auto_retry = node.get("auto_retry") or {}
        times, interval_ms = 0, 0
        if isinstance(auto_retry, dict) and auto_retry.get("enable", True):
            times = _non_negative_int(auto_retry.get("times", 0))
            interval_ms = _non_negative_int(auto_retry.get("interval", 0)) * 1000
        return replace(
            spec,
            component_code=component["code"],
            component_version=str(component.get("version") or "legacy"),
            inputs=inputs,
            auto_retry_times=times,
            auto_retry_interval_ms=interval_ms,
        )

    def _parse_vars(self, raw: Any, *, where: str, node_id: str = "") -> dict[str, VarSpec]:
        if not isinstance(raw, dict):
            self.problem("bad_field", f"{where}: inputs must be an object", node_id=node_id)
            return {}
        result: dict[str, VarSpec] = {}
        for key, var in raw.items():
            if not isinstance(var, dict) or ("value" not in var and "source_act" not in var):
                self.problem("bad_variable", f"{where}: input {key!r} must be {{'type', 'value'}}", node_id=node_id)
                continue
            if "source_act" in var:
                self.problem(
                    "unsupported_variable",
                    f"{where}: input {key!r} is a node-output reference, not supported by this engine version yet",
                    node_id=node_id,
                )
                continue
            var_type = var.get("type", "plain")
            if var_type not in VARIABLE_TYPES:
                self.problem("bad_variable", f"{where}: input {key!r} has unknown type {var_type!r}", node_id=node_id)
                continue
            if var_type == "lazy":
                self.problem(
                    "unsupported_variable",
                    f"{where}: input {key!r} is a lazy variable, not supported by this engine version yet",
                    node_id=node_id,
                )
                continue
            # bamboo's need_render=false means "take the text as it is".
            if var_type == "splice" and var.get("need_render", True) is False:
                var_type = "plain"
            result[key] = VarSpec(var_type, var["value"], str(var.get("custom_type") or ""))
        return result

    def _parse_flows(self, raw: dict[str, Any]) -> dict[str, FlowSpec]:
        flows: dict[str, FlowSpec] = {}
        for key, flow in self._section(raw, "flows"):
            if not isinstance(flow, dict):
                self.problem("bad_flow", f"flow {key!r} must be an object", flow_id=key)
                continue
            source, target = flow.get("source"), flow.get("target")
            if not isinstance(source, str) or not isinstance(target, str) or flow.get("id", key) != key:
                self.problem("bad_flow", f"flow {key!r} needs an id, a source and a target", flow_id=key)
                continue
            flows[key] = FlowSpec(key, source, target, bool(flow.get("is_default", False)))
        return flows

    def _parse_data(self, raw: dict[str, Any]) -> tuple[dict[str, VarSpec], tuple[str, ...]]:
        data = raw.get("data") or {}
        if not isinstance(data, dict):
            self.problem("bad_field", "'data' must be an object with 'inputs' and 'outputs'")
            return {}, ()
        inputs = self._parse_vars(data.get("inputs") or {}, where="data.inputs")
        outputs = data.get("outputs") or []
        if isinstance(outputs, dict):  # older trees keep outputs as {key: key}
            outputs = list(outputs)
        if not isinstance(outputs, list) or not all(isinstance(k, str) for k in outputs):
            self.problem("bad_field", "'data.outputs' must be a list of variable keys")
            outputs = []
        return inputs, tuple(outputs)


def _non_negative_int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _check_graph(spec: PipelineSpec, problems: list[Problem], *, cycle_tolerate: bool) -> None:
    def problem(code: str, message: str, *, node_id: str = "", flow_id: str = "") -> None:
        problems.append(Problem(code, message, node_id, flow_id))

    referenced: set[str] = set()
    for node in spec.nodes.values():
        for flow_id in node.outgoing:
            referenced.add(flow_id)
            flow = spec.flows.get(flow_id)
            if flow is None:
                problem(
                    "dangling_flow",
                    f"node {node.id!r} has outgoing flow {flow_id!r}, which does not exist",
                    node_id=node.id,
                    flow_id=flow_id,
                )
            elif flow.source != node.id:
                problem(
                    "flow_mismatch",
                    f"flow {flow_id!r} is outgoing of {node.id!r} but its source is {flow.source!r}",
                    node_id=node.id,
                    flow_id=flow_id,
                )
        for flow_id in node.incoming:
            referenced.add(flow_id)
            flow = spec.flows.get(flow_id)
            if flow is None:
                problem(
                    "dangling_flow",
                    f"node {node.id!r} has incoming flow {flow_id!r}, which does not exist",
                    node_id=node.id,
                    flow_id=flow_id,
                )
            elif flow.target != node.id:
                problem(
                    "flow_mismatch",
                    f"flow {flow_id!r} is incoming of {node.id!r} but its target is {flow.target!r}",
                    node_id=node.id,
                    flow_id=flow_id,
                )
    for flow in spec.flows.values():
        for endpoint, role in ((flow.source, "source"), (flow.target, "target")):
            if endpoint not in spec.nodes:
                problem(
                    "dangling_flow",
                    f"flow {flow.id!r} has {role} {endpoint!r}, which is not a node in the tree",
                    flow_id=flow.id,
                )
        if flow.id not in referenced and flow.source in spec.nodes and flow.target in spec.nodes:
            problem(
                "dangling_flow",
                f"flow {flow.id!r} is not listed in the outgoing of {flow.source!r} or the incoming of {flow.target!r}",
                flow_id=flow.id,
            )
    start, end_event = spec.nodes[spec.start_event_id], spec.nodes[spec.end_event_id]
    if start.incoming:
        problem("bad_start_event", f"start event {start.id!r} must have no incoming flow", node_id=start.id)
    if end_event.outgoing:
        problem("bad_end_event", f"end event {end_event.id!r} must have no outgoing flow", node_id=end_event.id)
    for node in spec.nodes.values():
        if node.type is not NodeType.EMPTY_END_EVENT and node.type is not NodeType.EXECUTABLE_END_EVENT:
            if not node.outgoing:
                problem("no_outgoing", f"node {node.id!r} has no outgoing flow", node_id=node.id)
            elif node.type in (NodeType.EMPTY_START_EVENT, NodeType.SERVICE_ACTIVITY) and len(node.outgoing) > 1:
                problem(
                    "too_many_outgoing",
                    f"{node.type.value} {node.id!r} must have exactly one outgoing flow, it has {len(node.outgoing)}",
                    node_id=node.id,
                )
    if problems:
        return
    reachable = _reachable(spec)
    for node_id in spec.nodes:
        if node_id not in reachable:
            problem(
                "unreachable_node",
                f"node {node_id!r} cannot be reached from the start event",
                node_id=node_id,
            )
    if not cycle_tolerate:
        cycle_node = _find_cycle(spec)
        if cycle_node is not None:
            problem(
                "cycle",
                f"the tree has a cycle through node {cycle_node!r} (start it with cycle_tolerate to allow loops)",
                node_id=cycle_node,
            )


def _reachable(spec: PipelineSpec) -> set[str]:
    seen = {spec.start_event_id}
    stack = [spec.start_event_id]
    while stack:
        for target in spec.next_node_ids(stack.pop()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def _find_cycle(spec: PipelineSpec) -> str | None:
    """Iterative depth-first search; returns a node on a cycle, or None."""
    visiting, done = 1, 2
    marks: dict[str, int] = {}
    for root in spec.nodes:
        if root in marks:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        marks[root] = visiting
        while stack:
            node_id, index = stack[-1]
            targets = spec.next_node_ids(node_id)
            if index < len(targets):
                stack[-1] = (node_id, index + 1)
                target = targets[index]
                mark = marks.get(target)
                if mark == visiting:
                    return target
                if mark is None:
                    marks[target] = visiting
                    stack.append((target, 0))
            else:
                marks[node_id] = done
                stack.pop()
    return None


def _check_variables(spec: PipelineSpec, problems: list[Problem]) -> None:
    """Every ${name} a splice refers to must be defined in data.inputs (bamboo would pass the raw text on)."""
    defined = set(spec.inputs)
    for key, var in spec.inputs.items():
        _check_splice(var, defined, f"data.inputs {key!r}", "", problems)
    for node in spec.nodes.values():
        for key, var in node.inputs.items():
            _check_splice(var, defined, f"input {key!r} of {node.id!r}", node.id, problems)


def _check_splice(var: VarSpec, defined: set[str], where: str, node_id: str, problems: list[Problem]) -> None:
    if var.type != "splice":
        return
    names, unsupported = splice_references(var.value)
    for expression in unsupported:
        problems.append(
            Problem(
                "unsupported_expression",
                f"{where} uses the expression ${{{expression}}}; this engine version only substitutes variable names",
                node_id,
            )
        )
    for name in sorted(names):
        if f"${{{name}}}" not in defined:
            problems.append(
                Problem(
                    "unknown_variable",
                    f"{where} refers to ${{{name}}}, which the pipeline does not define",
                    node_id,
                )
            )
