"""Parsing and validation of bamboo-engine pipeline trees.

`parse_tree` turns the JSON layout into a `PipelineSpec` (subprocesses nested), or raises `TreeError`
listing every problem found, each naming the node or flow it is about. It never raises anything else for
bad input. `check_variables` then checks that every variable an expression uses is defined.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine_server.core.expressions import ExpressionError, cached_condition, cached_splice, splice_names
from engine_server.core.frozen import evolve, fast_init
from engine_server.core.lazy import LAZY_RESOLVERS
from engine_server.core.model import (
    DIVERGING_GATEWAYS,
    END_EVENTS,
    FORKING_GATEWAYS,
    FlowSpec,
    NodeSpec,
    NodeType,
    PipelineSpec,
    TreeIndex,
    VarSpec,
)

VARIABLE_TYPES = frozenset({"plain", "splice", "lazy"})
CONDITION_GATEWAYS = frozenset({NodeType.EXCLUSIVE_GATEWAY, NodeType.CONDITIONAL_PARALLEL_GATEWAY})


@fast_init
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
    result = dict(pairs)
    if len(result) != len(pairs):  # rare: find the key only then (this hook runs for every object)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return result


def load_tree_json(text: str | bytes) -> Any:
    """Parses tree JSON, refusing duplicate keys (JSON would silently keep the last node of an id)."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise TreeError([Problem("duplicate_id", f"duplicate id {exc.args[0]!r} in the tree JSON")]) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TreeError([Problem("not_json", f"the tree is not valid JSON: {exc}")]) from None
    except RecursionError:
        raise TreeError([Problem("too_deep", "the tree JSON is nested too deeply to read")]) from None


def parse_tree(raw: Any, *, cycle_tolerate: bool = False) -> PipelineSpec:
    """Parses and validates a tree (already decoded from JSON), subprocesses included."""
    try:
        return _parse_tree(raw, cycle_tolerate)
    except RecursionError:  # subprocesses within subprocesses, hundreds deep
        raise TreeError([Problem("too_deep", "the tree is nested too deeply to read")]) from None


def _parse_tree(raw: Any, cycle_tolerate: bool) -> PipelineSpec:
    problems: list[Problem] = []
    seen_ids: dict[str, str] = {}
    root = _TreeParser(raw, problems, seen_ids, where="the tree").parse()
    if root is None or problems:
        raise TreeError(problems or [Problem("bad_tree", "the tree could not be read")])
    scopes = _collect_scopes(root)
    converges: dict[str, str] = {}
    for scope_spec in scopes.values():
        _check_graph(scope_spec, problems, cycle_tolerate=cycle_tolerate)
        if not problems:
            # Without cycle_tolerate, _check_graph has already refused any cycle.
            converges.update(_find_converges(scope_spec, problems, acyclic=not cycle_tolerate))
    if problems:
        raise TreeError(problems)
    index = _build_index(scopes, converges, problems)
    if problems:
        raise TreeError(problems)
    return evolve(root, index=index)


def check_variables(spec: PipelineSpec, preset_keys: Iterable[str] = ()) -> list[Problem]:
    """Every variable an expression uses must be defined at its level (or given at Start).

    bamboo passes an undefined `${x}` on as raw text; here it is refused before anything runs.
    """
    presets = {_var_key(k) for k in preset_keys}
    problems: list[Problem] = []
    tree = spec.tree
    for scope_id, scope in tree.scopes.items():
        defined = set(scope.inputs) | presets

        def check(names: Iterable[str], where: str, node_id: str, defined: set[str] = defined) -> None:
            for name in sorted(set(names)):
                if f"${{{name}}}" not in defined:
                    problems.append(
                        Problem("unknown_variable", f"{where} uses ${{{name}}}, which is not defined", node_id)
                    )

        for key, var in scope.inputs.items():
            check(_var_names(var), f"variable {key} of {_level(scope_id)}", "")
        for node in scope.nodes.values():
            for key, var in node.inputs.items():
                check(_var_names(var), f"input {key!r} of node {node.id!r}", node.id)
            for key, var in node.params.items():
                check(_var_names(var), f"param {key} of subprocess {node.id!r}", node.id)
            for flow_id, text in node.conditions.items():
                check(cached_condition(text).names, f"the condition of flow {flow_id!r} ({text!r})", node.id)
    return problems


def _level(scope_id: str) -> str:
    return f"subprocess {scope_id!r}" if scope_id else "the pipeline"


def _var_key(name: str) -> str:
    return name if name.startswith("${") and name.endswith("}") else f"${{{name}}}"


def _var_names(var: VarSpec) -> frozenset[str]:
    if var.type == "plain" or var.sources:
        return frozenset()
    return splice_names(var.value)


def _as_id_list(value: Any) -> tuple[str, ...] | None:
    """bamboo writes a single incoming/outgoing flow as a string, several as a list, none as ""."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    return None


def _non_negative_int(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


class _TreeParser:
    """Reads one pipeline level; SubProcess nodes recurse with the same problem list and id registry."""

    def __init__(self, raw: Any, problems: list[Problem], seen_ids: dict[str, str], *, where: str) -> None:
        self.raw = raw
        self.problems = problems
        self.seen_ids = seen_ids
        self.where = where

    def problem(self, code: str, message: str, *, node_id: str = "", flow_id: str = "") -> None:
        self.problems.append(Problem(code, message, node_id, flow_id))

    def claim_id(self, element_id: str, what: str, *, node_id: str = "", flow_id: str = "") -> bool:
        """Ids are unique across the whole tree, subprocesses included."""
        if element_id in self.seen_ids:
            self.problem(
                "duplicate_id",
                f"id {element_id!r} is used by a {self.seen_ids[element_id]} and a {what}",
                node_id=node_id,
                flow_id=flow_id,
            )
            return False
        self.seen_ids[element_id] = what
        return True

    def parse(self) -> PipelineSpec | None:
        raw = self.raw
        if not isinstance(raw, dict):
            self.problem("not_an_object", f"{self.where} must be a JSON object, not {type(raw).__name__}")
            return None
        tree_id = raw.get("id", "")
        if not isinstance(tree_id, str):
            self.problem("bad_field", f"the 'id' of {self.where} must be a string")
            tree_id = ""
        nodes: dict[str, NodeSpec] = {}
        start = self._parse_event(raw, "start_event", nodes)
        end = self._parse_event(raw, "end_event", nodes)
        for section in ("activities", "gateways"):
            for node in self._section(raw, section):
                self._add_node(node, nodes)
        flows = self._parse_flows(raw)
        inputs, outputs, pre_render_keys = self._parse_data(raw)
        if start is None or end is None:
            return None
        return PipelineSpec(
            id=tree_id,
            start_event_id=start,
            end_event_id=end,
            nodes=nodes,
            flows=flows,
            inputs=inputs,
            outputs=outputs,
            pre_render_keys=pre_render_keys,
        )

    def _section(self, raw: dict[str, Any], name: str) -> Iterable[tuple[str, Any]]:
        section = raw.get(name, {})
        if section is None:
            return []
        if not isinstance(section, dict):
            self.problem("bad_field", f"'{name}' of {self.where} must be an object of id -> node")
            return []
        return section.items()

    def _parse_event(self, raw: dict[str, Any], key: str, nodes: dict[str, NodeSpec]) -> str | None:
        event = raw.get(key)
        label = key.replace("_", " ")
        if not isinstance(event, dict) or not event:
            code = "no_start_event" if key == "start_event" else "no_end_event"
            self.problem(code, f"{self.where} has no {label}")
            return None
        node_id = event.get("id")
        if not isinstance(node_id, str) or not node_id:
            self.problem("bad_field", f"the {label} of {self.where} has no id")
            return None
        type_name = event.get("type")
        if key == "start_event":
            if type_name not in (None, NodeType.EMPTY_START_EVENT.value):
                self.problem("bad_node_type", f"the start event {node_id!r} has type {type_name!r}", node_id=node_id)
            self._add_node((node_id, {**event, "type": NodeType.EMPTY_START_EVENT.value}), nodes, event=True)
        elif type_name in (None, NodeType.EMPTY_END_EVENT.value):
            self._add_node((node_id, {**event, "type": NodeType.EMPTY_END_EVENT.value}), nodes, event=True)
        else:
            # bamboo names an executable end event by its own class name; that name is the task's code.
            code = event.get("code") or (
                type_name if type_name != NodeType.EXECUTABLE_END_EVENT.value else "ExecutableEndEvent"
            )
            node = {**event, "type": NodeType.EXECUTABLE_END_EVENT.value, "component": {"code": code}}
            self._add_node((node_id, node), nodes, event=True)
        return node_id

    def _add_node(self, item: tuple[str, Any], nodes: dict[str, NodeSpec], *, event: bool = False) -> None:
        key, node = item
        if not isinstance(node, dict):
            self.problem("bad_node", f"node {key!r} must be an object", node_id=key)
            return
        node_id = node.get("id", key)
        if node_id != key:
            self.problem("bad_node", f"node {key!r} has a different id {node_id!r}", node_id=key)
            return
        type_name = node.get("type")
        try:
            node_type = NodeType(type_name)
        except ValueError:
            self.problem("unknown_node_type", f"node {key!r} has unknown type {type_name!r}", node_id=key)
            return
        if not event and node_type in (NodeType.EMPTY_START_EVENT, NodeType.EMPTY_END_EVENT):
            self.problem(
                "duplicate_start_or_end",
                f"node {key!r} is a {node_type.value}; a pipeline has exactly one start and one end event",
                node_id=key,
            )
            return
        if not self.claim_id(key, "node", node_id=key):
            return
        incoming = _as_id_list(node.get("incoming"))
        outgoing = _as_id_list(node.get("outgoing"))
        if incoming is None or outgoing is None:
            self.problem(
                "bad_field", f"node {key!r}: incoming/outgoing must be a flow id or a list of them", node_id=key
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
        if node_type in (NodeType.SERVICE_ACTIVITY, NodeType.EXECUTABLE_END_EVENT):
            spec = self._with_component(spec, node)
        elif node_type in CONDITION_GATEWAYS:
            spec = self._with_conditions(spec, node)
        elif node_type is NodeType.SUBPROCESS:
            spec = self._with_subprocess(spec, node)
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
        timeout_ms, timeout_skips = self._timeout(spec, node.get("timeout_config"))
        return evolve(
            spec,
            component_code=component["code"],
            component_version=str(component.get("version") or "legacy"),
            inputs=inputs,
            auto_retry_times=times,
            auto_retry_interval_ms=interval_ms,
            timeout_ms=timeout_ms,
            timeout_skips=timeout_skips,
        )

    def _timeout(self, spec: NodeSpec, config: Any) -> tuple[int, bool]:
        if not isinstance(config, dict) or not config.get("enable", True) or not config.get("seconds"):
            return 0, False
        action = config.get("action", "forced_fail")
        if action not in ("forced_fail", "forced_fail_and_skip"):
            self.problem(
                "bad_field",
                f"activity {spec.id!r}: timeout_config action must be forced_fail or forced_fail_and_skip, "
                f"not {action!r}",
                node_id=spec.id,
            )
        seconds = config.get("seconds")
        if not isinstance(seconds, int | float) or seconds <= 0:
            self.problem("bad_field", f"activity {spec.id!r}: timeout_config seconds must be positive", node_id=spec.id)
            return 0, False
        return int(seconds * 1000), action == "forced_fail_and_skip"

    def _with_conditions(self, spec: NodeSpec, node: dict[str, Any]) -> NodeSpec:
        raw = node.get("conditions") or {}
        conditions: dict[str, str] = {}
        if not isinstance(raw, dict):
            self.problem("bad_field", f"gateway {spec.id!r}: conditions must be an object", node_id=spec.id)
            raw = {}
        for flow_id, condition in raw.items():
            text = condition.get("evaluate") if isinstance(condition, dict) else None
            if not isinstance(text, str):
                self.problem(
                    "bad_condition",
                    f"gateway {spec.id!r}: the condition of flow {flow_id!r} needs an 'evaluate' text",
                    node_id=spec.id,
                    flow_id=flow_id,
                )
                continue
            try:
                cached_condition(text)
            except ExpressionError as exc:
                self.problem(
                    "bad_expression",
                    f"gateway {spec.id!r}, flow {flow_id!r}: {exc}",
                    node_id=spec.id,
                    flow_id=flow_id,
                )
                continue
            conditions[flow_id] = text
        default = node.get("default_condition") or {}
        default_flow = default.get("flow_id", "") if isinstance(default, dict) else ""
        return evolve(spec, conditions=conditions, default_flow=default_flow or "")

    def _with_subprocess(self, spec: NodeSpec, node: dict[str, Any]) -> NodeSpec:
        child_raw = node.get("pipeline")
        child = _TreeParser(child_raw, self.problems, self.seen_ids, where=f"subprocess {spec.id!r}").parse()
        params = self._parse_vars(node.get("params") or {}, where=f"subprocess {spec.id!r} params", node_id=spec.id)
        if child is not None:
            for key in params:
                if key not in child.inputs:
                    self.problem(
                        "unknown_param",
                        f"subprocess {spec.id!r} is given param {key}, which its pipeline does not define",
                        node_id=spec.id,
                    )
        return evolve(spec, subprocess=child, params=params)

    def _parse_vars(self, raw: Any, *, where: str, node_id: str = "") -> dict[str, VarSpec]:
        if not isinstance(raw, dict):
            self.problem("bad_field", f"{where}: inputs must be an object", node_id=node_id)
            return {}
        result: dict[str, VarSpec] = {}
        for key, var in raw.items():
            parsed = self._parse_var(key, var, where=where, node_id=node_id)
            if parsed is not None:
                result[key] = parsed
        return result

    def _parse_var(self, key: str, var: Any, *, where: str, node_id: str) -> VarSpec | None:
        if not isinstance(var, dict) or ("value" not in var and "source_act" not in var):
            self.problem("bad_variable", f"{where}: {key!r} must be {{'type', 'value'}}", node_id=node_id)
            return None
        var_type = var.get("type", "plain")
        if var_type not in VARIABLE_TYPES:
            self.problem("bad_variable", f"{where}: {key!r} has unknown type {var_type!r}", node_id=node_id)
            return None
        custom_type = str(var.get("custom_type") or "")
        if var_type == "lazy" and custom_type not in LAZY_RESOLVERS:
            known = ", ".join(sorted(LAZY_RESOLVERS))
            self.problem(
                "unknown_lazy_type",
                f"{where}: {key!r} is a lazy variable of custom_type {custom_type!r}; this engine resolves {known}",
                node_id=node_id,
            )
            return None
        sources = self._parse_sources(var.get("source_act"), var.get("source_key"), key, where, node_id)
        if sources is None:
            return None
        # bamboo's need_render=false means "take the text as it is".
        if var_type == "splice" and var.get("need_render", True) is False:
            var_type = "plain"
        value = var.get("value")
        if var_type != "plain" and not sources:
            try:
                cached_splice(value) if isinstance(value, str) else splice_names(value)
            except ExpressionError as exc:
                self.problem("bad_expression", f"{where}: {key!r}: {exc}", node_id=node_id)
                return None
        return VarSpec(var_type, value, custom_type, sources, bool(var.get("is_param", False)))

    def _parse_sources(
        self, source_act: Any, source_key: Any, key: str, where: str, node_id: str
    ) -> tuple[tuple[str, str], ...] | None:
        if source_act is None:
            return ()
        pairs: list[tuple[Any, Any]] = []
        if isinstance(source_act, str):
            pairs.append((source_act, source_key))
        elif isinstance(source_act, list):  # the rewritable form: [{"source_act", "source_key"}, ...]
            pairs.extend(
                (item.get("source_act"), item.get("source_key")) for item in source_act if isinstance(item, dict)
            )
            if len(pairs) != len(source_act):
                pairs.append((None, None))
        if not pairs or not all(isinstance(a, str) and a and isinstance(k, str) and k for a, k in pairs):
            self.problem(
                "bad_variable",
                f"{where}: {key!r} must name source_act and source_key (or a list of them)",
                node_id=node_id,
            )
            return None
        return tuple((a, k) for a, k in pairs)

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
            if not self.claim_id(key, "flow", flow_id=key):
                continue
            flows[key] = FlowSpec(key, source, target, bool(flow.get("is_default", False)))
        return flows

    def _parse_data(self, raw: dict[str, Any]) -> tuple[dict[str, VarSpec], tuple[str, ...], tuple[str, ...]]:
        data = raw.get("data") or {}
        if not isinstance(data, dict):
            self.problem("bad_field", f"'data' of {self.where} must be an object with 'inputs' and 'outputs'")
            return {}, (), ()
        inputs = self._parse_vars(data.get("inputs") or {}, where=f"data.inputs of {self.where}")
        outputs = data.get("outputs") or []
        if isinstance(outputs, dict):  # older trees keep outputs as {key: key}
            outputs = list(outputs)
        if not isinstance(outputs, list) or not all(isinstance(k, str) for k in outputs):
            self.problem("bad_field", f"'data.outputs' of {self.where} must be a list of variable keys")
            outputs = []
        for key in outputs:
            if key not in inputs:
                self.problem("unknown_output", f"data.outputs of {self.where} names {key}, which is not a variable")
        pre_render = data.get("pre_render_keys") or []
        if not isinstance(pre_render, list) or not all(isinstance(k, str) and k in inputs for k in pre_render):
            self.problem("bad_field", f"'data.pre_render_keys' of {self.where} must list variables of data.inputs")
            pre_render = []
        return inputs, tuple(outputs), tuple(pre_render)


def _collect_scopes(root: PipelineSpec) -> dict[str, PipelineSpec]:
    scopes = {"": root}
    pending = [root]
    while pending:
        spec = pending.pop()
        for node in spec.nodes.values():
            if node.subprocess is not None:
                scopes[node.id] = node.subprocess
                pending.append(node.subprocess)
    return scopes


def _build_index(scopes: dict[str, PipelineSpec], converges: dict[str, str], problems: list[Problem]) -> TreeIndex:
    nodes: dict[str, NodeSpec] = {}
    scope_of: dict[str, str] = {}
    flows: dict[str, FlowSpec] = {}
    for scope_id, spec in scopes.items():
        for node_id, node in spec.nodes.items():
            nodes[node_id] = node
            scope_of[node_id] = scope_id
        flows.update(spec.flows)
    output_refs: dict[str, list[tuple[str, str, str]]] = {}
    for scope_id, spec in scopes.items():
        for key, var in spec.inputs.items():
            for source_act, source_key in var.sources:
                if scope_of.get(source_act) != scope_id:
                    problems.append(
                        Problem(
                            "unknown_source",
                            f"variable {key} of {_level(scope_id)} reads the output of {source_act!r}, "
                            "which is not a node of that pipeline",
                            source_act if source_act in nodes else "",
                        )
                    )
                    continue
                output_refs.setdefault(source_act, []).append((scope_id, key, source_key))
    return TreeIndex(
        nodes=nodes,
        scope_of=scope_of,
        scopes=scopes,
        flows=flows,
        converge_of=converges,
        output_refs={node_id: tuple(refs) for node_id, refs in output_refs.items()},
    )


def _check_graph(spec: PipelineSpec, problems: list[Problem], *, cycle_tolerate: bool) -> None:
    def problem(code: str, message: str, *, node_id: str = "", flow_id: str = "") -> None:
        problems.append(Problem(code, message, node_id, flow_id))

    before = len(problems)
    referenced: set[str] = set()
    for node in spec.nodes.values():
        for direction, flow_ids in (("outgoing", node.outgoing), ("incoming", node.incoming)):
            for flow_id in flow_ids:
                referenced.add(flow_id)
                flow = spec.flows.get(flow_id)
                end_ok = flow is not None and (flow.source if direction == "outgoing" else flow.target) == node.id
                if flow is None:
                    problem(
                        "dangling_flow",
                        f"node {node.id!r} has {direction} flow {flow_id!r}, which does not exist",
                        node_id=node.id,
                        flow_id=flow_id,
                    )
                elif not end_ok:
                    problem(
                        "flow_mismatch",
                        f"flow {flow_id!r} is {direction} of {node.id!r} "
                        f"but connects {flow.source!r} -> {flow.target!r}",
                        node_id=node.id,
                        flow_id=flow_id,
                    )
    for flow in spec.flows.values():
        for endpoint, role in ((flow.source, "source"), (flow.target, "target")):
            if endpoint not in spec.nodes:
                problem(
                    "dangling_flow",
                    f"flow {flow.id!r} has {role} {endpoint!r}, which is not a node of the same pipeline",
                    flow_id=flow.id,
                )
        if flow.id not in referenced and flow.source in spec.nodes and flow.target in spec.nodes:
            problem(
                "dangling_flow",
                f"flow {flow.id!r} is not listed in the outgoing of {flow.source!r} or the incoming of {flow.target!r}",
                flow_id=flow.id,
            )
    start = spec.nodes[spec.start_event_id]
    if start.incoming:
        problem("bad_start_event", f"start event {start.id!r} must have no incoming flow", node_id=start.id)
    for node in spec.nodes.values():
        _check_node_shape(node, problem)
    if len(problems) > before:
        return
    reachable = _reachable(spec)
    for node_id in spec.nodes:
        if node_id not in reachable:
            problem("unreachable_node", f"node {node_id!r} cannot be reached from the start event", node_id=node_id)
    if not cycle_tolerate:
        cycle_node = _find_cycle(spec)
        if cycle_node is not None:
            problem(
                "cycle",
                f"the tree has a cycle through node {cycle_node!r} (start it with cycle_tolerate to allow loops)",
                node_id=cycle_node,
            )


def _check_node_shape(node: NodeSpec, problem: Any) -> None:
    kind = node.type.value
    if node.type in END_EVENTS:
        if node.outgoing:
            problem("bad_end_event", f"end event {node.id!r} must have no outgoing flow", node_id=node.id)
        return
    if not node.outgoing:
        problem("no_outgoing", f"node {node.id!r} has no outgoing flow", node_id=node.id)
        return
    if node.type not in DIVERGING_GATEWAYS and len(node.outgoing) > 1:
        problem(
            "too_many_outgoing",
            f"{kind} {node.id!r} must have exactly one outgoing flow, it has {len(node.outgoing)}",
            node_id=node.id,
        )
    if node.type in CONDITION_GATEWAYS:
        for flow_id in node.conditions:
            if flow_id not in node.outgoing:
                problem(
                    "condition_on_unknown_flow",
                    f"{kind} {node.id!r} has a condition for flow {flow_id!r}, which is not one of its outgoing flows",
                    node_id=node.id,
                    flow_id=flow_id,
                )
        if node.default_flow and node.default_flow not in node.outgoing:
            problem(
                "condition_on_unknown_flow",
                f"{kind} {node.id!r} has default flow {node.default_flow!r}, which is not one of its outgoing flows",
                node_id=node.id,
                flow_id=node.default_flow,
            )
        for flow_id in node.outgoing:
            if flow_id not in node.conditions and flow_id != node.default_flow:
                problem(
                    "no_condition",
                    f"{kind} {node.id!r}: outgoing flow {flow_id!r} has no condition and is not the default",
                    node_id=node.id,
                    flow_id=flow_id,
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


class _ConvergeFinder:
    """Finds the converge gateway of every parallel and conditional parallel gateway.

    For each node, `sequence` lists the converge gateways that every forward path from it passes through,
    in order. A nested fork's own converge is stepped over; an exclusive gateway's branches keep only the
    converge gateways they all share (a branch that loops back is left out). A fork's converge is the first
    gateway common to all its branches' sequences.
    """

    def __init__(self, spec: PipelineSpec, problems: list[Problem]) -> None:
        self.spec = spec
        self.problems = problems
        self.converge_of: dict[str, str] = {}
        self.failed: set[str] = set()
        self.memo: dict[str, list[str] | None] = {}
        self.forks_in_progress: set[str] = set()
        self.in_progress: set[str] = set()

    def converge(self, fork_id: str) -> str | None:
        if fork_id in self.converge_of:
            return self.converge_of[fork_id]
        if fork_id in self.failed or fork_id in self.forks_in_progress:
            return None
        self.forks_in_progress.add(fork_id)
        node = self.spec.nodes[fork_id]
        branches = [self.sequence(target) for target in self.spec.next_node_ids(fork_id)]
        self.forks_in_progress.discard(fork_id)
        forward = [b for b in branches if b is not None]
        common = [c for c in forward[0] if all(c in b for b in forward[1:])] if forward else []
        if not common or len(forward) != len(branches):
            self.failed.add(fork_id)
            self.problems.append(
                Problem(
                    "no_converge",
                    f"{node.type.value} {fork_id!r} never converges: its branches do not all meet at one "
                    "ConvergeGateway",
                    fork_id,
                )
            )
            return None
        self.converge_of[fork_id] = common[0]
        return common[0]

    def sequence(self, node_id: str) -> list[str] | None:
        """Converge gateways every forward path from node_id passes, in order; None if it only loops back."""
        if node_id in self.memo:
            return self.memo[node_id]
        if node_id in self.in_progress:
            return None
        self.in_progress.add(node_id)
        result: list[str] | None = []
        current = node_id
        visited = {node_id}
        while True:
            node = self.spec.nodes[current]
            assert result is not None
            if node.type in END_EVENTS:
                break
            if node.type is NodeType.CONVERGE_GATEWAY:
                result.append(current)
                following = self.spec.next_node_ids(current)[0]
            elif node.type in FORKING_GATEWAYS:
                converge = self.converge(current)
                if converge is None:
                    break
                following = self.spec.next_node_ids(converge)[0]
            elif node.type is NodeType.EXCLUSIVE_GATEWAY:
                branches = [self.sequence(t) for t in self.spec.next_node_ids(current)]
                forward = [b for b in branches if b is not None]
                if not forward:
                    result = result or None
                else:
                    result.extend(c for c in forward[0] if all(c in b for b in forward[1:]))
                break
            else:
                following = self.spec.next_node_ids(current)[0]
            if following in visited or following in self.in_progress:
                if not result:
                    result = None  # this path only loops back
                break
            visited.add(following)
            current = following
        self.in_progress.discard(node_id)
        self.memo[node_id] = result
        return result


def _find_converges(spec: PipelineSpec, problems: list[Problem], *, acyclic: bool) -> dict[str, str]:
    forks = [node.id for node in spec.nodes.values() if node.type in FORKING_GATEWAYS]
    if acyclic or _find_cycle(spec) is None:
        # The finder recurses into every fork it meets downstream; taken from the end of the flow backwards,
        # each meets only forks already solved, so hundreds of parallel blocks in a row stay within Python's
        # recursion limit. (Without cycles the answers do not depend on the order; with them the tree order is kept.)
        distance = _distances_from_start(spec)
        forks.sort(key=lambda fork_id: -distance.get(fork_id, 0))
    found: list[Problem] = []
    finder = _ConvergeFinder(spec, found)
    for fork_id in forks:
        finder.converge(fork_id)
    position = {node_id: number for number, node_id in enumerate(spec.nodes)}
    problems.extend(sorted(found, key=lambda problem: position.get(problem.node_id, 0)))
    return finder.converge_of


def _distances_from_start(spec: PipelineSpec) -> dict[str, int]:
    """Flows from the start event to each node it reaches, by the shortest path."""
    distance = {spec.start_event_id: 0}
    frontier = [spec.start_event_id]
    while frontier:
        following: list[str] = []
        for node_id in frontier:
            for target in spec.next_node_ids(node_id):
                if target not in distance:
                    distance[target] = distance[node_id] + 1
                    following.append(target)
        frontier = following
    return distance
