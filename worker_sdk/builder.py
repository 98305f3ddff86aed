"""Build bamboo pipeline trees in Python, with the API of bamboo-engine's builder.

    start = EmptyStartEvent()
    greet = ServiceActivity(component_code="greet")
    greet.component.inputs.name = Var(type=Var.SPLICE, value="${name}")
    start.extend(greet).extend(EmptyEndEvent())

    data = Data()
    data.inputs["${name}"] = Var(type=Var.PLAIN, value="world")
    tree = build_tree(start, data=data)

The result has bamboo's layout (``activities`` / ``gateways`` / ``flows`` dicts, ``incoming`` and
``outgoing`` flow ids, the same node fields and type names, and bamboo's id scheme: a one-letter
prefix and 32 hex digits, ``e`` for elements, ``f`` for flows, ``p`` for pipelines), so trees built
here also run on bamboo-engine, and trees written for bamboo run here. Where bamboo's builder would
silently lose part of the graph (two outgoing connections on an activity, two end events, two
elements sharing an id) this one raises ValueError instead.
"""

from __future__ import annotations

import copy
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

__all__ = [
    "ConditionalParallelGateway",
    "ConvergeGateway",
    "Data",
    "DataInput",
    "Element",
    "EmptyEndEvent",
    "EmptyStartEvent",
    "ExclusiveGateway",
    "ExecutableEndEvent",
    "NodeOutput",
    "ParallelGateway",
    "Params",
    "RewritableNodeOutput",
    "ServiceActivity",
    "SubProcess",
    "Var",
    "build_tree",
]

E = TypeVar("E", bound="Element")


def _unique_id(prefix: str) -> str:
    """bamboo's id scheme: one letter, then a uuid4 in hex (33 characters)."""
    return prefix + uuid.uuid4().hex


class AttrDict(dict[str, Any]):
    """A dict whose keys are also attributes, so ``inputs.name = Var(...)`` works as in bamboo."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# --- variables -------------------------------------------------------------------------------------


class Var:
    """A variable: a plain value, a splice template (``"hello ${name}"``) or a lazy custom type."""

    PLAIN: ClassVar[str] = "plain"
    SPLICE: ClassVar[str] = "splice"
    LAZY: ClassVar[str] = "lazy"

    def __init__(self, type: str, value: Any = None, custom_type: str | None = None) -> None:
        self.type = type
        self.value = value
        self.custom_type = custom_type

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"type": self.type, "value": self.value}
        if self.type == Var.LAZY:
            result["custom_type"] = self.custom_type
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"


class DataInput(Var):
    """A subprocess input that the parent may set through `Params`."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "is_param": True}


class NodeOutput(Var):
    """A pipeline variable that takes the output `source_key` of the node `source_act`."""

    def __init__(
        self,
        source_act: str,
        source_key: str,
        type: str = Var.SPLICE,
        value: Any = None,
        custom_type: str | None = None,
    ) -> None:
        super().__init__(type=type, value=value, custom_type=custom_type)
        self.source_act = source_act
        self.source_key = source_key

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "source_act": self.source_act, "source_key": self.source_key}


class RewritableNodeOutput(Var):
    """A pipeline variable that several nodes may write: `source_act` lists
    ``{"source_act": node_id, "source_key": key}`` pairs; the last one to finish wins."""

    def __init__(
        self,
        source_act: Sequence[Mapping[str, str]],
        type: str = Var.SPLICE,
        value: Any = None,
        custom_type: str | None = None,
    ) -> None:
        super().__init__(type=type, value=value, custom_type=custom_type)
        self.source_act = [dict(source) for source in source_act]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "source_act": [dict(source) for source in self.source_act]}


def _var_dict(value: Any) -> Any:
    """A `Var` as its tree dict; anything else (an already-built dict) is copied as it is."""
    return value.to_dict() if isinstance(value, Var) else copy.deepcopy(value)


class Data:
    """A pipeline's variables: ``inputs`` keyed ``"${name}"``, and the keys it ``outputs``."""

    def __init__(
        self,
        inputs: Mapping[str, Any] | None = None,
        outputs: Iterable[str] | None = None,
        pre_render_keys: Iterable[str] | None = None,
    ) -> None:
        self.inputs = AttrDict(inputs or {})
        self.outputs: list[str] = list(outputs or [])
        self.pre_render_keys: list[str] = list(pre_render_keys or [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": {key: _var_dict(value) for key, value in self.inputs.items()},
            "outputs": list(self.outputs),
            "pre_render_keys": list(self.pre_render_keys),
        }


class Params:
    """The values a parent passes to a subprocess's inputs, keyed like the subprocess's data."""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = AttrDict(params or {})

    def to_dict(self) -> dict[str, Any]:
        return {key: _var_dict(value) for key, value in self.params.items()}


# --- elements --------------------------------------------------------------------------------------


class Element:
    """A node of the flow graph. Connect elements, then pass the start event to `build_tree`."""

    NODE_TYPE: ClassVar[str] = ""

    def __init__(self, id: str | None = None, name: str | None = None, outgoing: list[Element] | None = None) -> None:
        self.id = id or _unique_id("e")
        self.name = name
        self.outgoing: list[Element] = outgoing if outgoing is not None else []

    def type(self) -> str:
        """The node's type name in the tree."""
        return self.NODE_TYPE

    def extend(self, element: E) -> E:
        """Connects self to `element` and returns `element`, for chains: ``a.extend(b).extend(c)``."""
        self.outgoing.append(element)
        return element

    def connect(self, *elements: Element) -> Element:
        """Connects self to each of `elements` (gateway branches) and returns self."""
        self.outgoing.extend(elements)
        return self

    def converge(self, element: E) -> E:
        """Connects the tail of every branch leaving self to `element` and returns `element`."""
        for branch in self.outgoing:
            branch.tail().connect(element)
        return element

    def to(self, element: E) -> E:
        """Returns `element`: continues a chain from an element built earlier."""
        return element

    def tail(self) -> Element:
        """The last element reached by following first connections from self."""
        element: Element = self
        while element.outgoing:
            element = element.outgoing[0]
        return element

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Element) and self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}:{self.id}>"


class EmptyStartEvent(Element):
    NODE_TYPE = "EmptyStartEvent"


class EmptyEndEvent(Element):
    NODE_TYPE = "EmptyEndEvent"


class ExecutableEndEvent(Element):
    """An end event of a custom `type`, whose component runs when the pipeline ends."""

    def __init__(
        self, type: str, id: str | None = None, name: str | None = None, outgoing: list[Element] | None = None
    ) -> None:
        super().__init__(id=id, name=name, outgoing=outgoing)
        self._type = type

    def type(self) -> str:
        return self._type


class _ComponentSpec:
    """``activity.component``: the code and version to run, and its inputs (``.inputs.<key> = Var``)."""

    def __init__(self, code: str | None, version: str) -> None:
        self.code = code
        self.version = version
        self.inputs = AttrDict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "inputs": {key: _var_dict(value) for key, value in self.inputs.items()},
            "version": self.version,
        }


class ServiceActivity(Element):
    """A node whose work a worker does: the component `component_code` at `component_version`.

    `timeout_config` (``{"enable", "seconds", "action"}``) and `auto_retry`
    (``{"enable", "times", "interval"}``) are written to the node as given, only when set.
    """

    NODE_TYPE = "ServiceActivity"

    def __init__(
        self,
        component_code: str | None = None,
        error_ignorable: bool = False,
        timeout: int | None = None,
        skippable: bool = True,
        retryable: bool = True,
        id: str | None = None,
        name: str | None = None,
        outgoing: list[Element] | None = None,
        *,
        timeout_config: Mapping[str, Any] | None = None,
        auto_retry: Mapping[str, Any] | None = None,
        component_version: str = "legacy",
    ) -> None:
        super().__init__(id=id, name=name, outgoing=outgoing)
        self.component = _ComponentSpec(component_code, component_version)
        self.error_ignorable = error_ignorable
        self.timeout = timeout
        self.skippable = skippable
        self.retryable = retryable
        self.timeout_config = dict(timeout_config) if timeout_config is not None else None
        self.auto_retry = dict(auto_retry) if auto_retry is not None else None

    def component_dict(self) -> dict[str, Any]:
        return self.component.to_dict()


class SubProcess(Element):
    """A node that runs a nested pipeline starting at `start`, with its own `data`.

    `params` (a `Params` or a dict of vars) are rendered in the parent and become the nested
    pipeline's inputs; its ``data.outputs`` become this node's outputs.
    """

    NODE_TYPE = "SubProcess"

    def __init__(
        self,
        start: EmptyStartEvent | None = None,
        data: Data | Mapping[str, Any] | None = None,
        params: Params | Mapping[str, Any] | None = None,
        global_outputs: Mapping[str, Any] | None = None,
        id: str | None = None,
        name: str | None = None,
        outgoing: list[Element] | None = None,
    ) -> None:
        super().__init__(id=id, name=name, outgoing=outgoing)
        self.start = start
        self.data = data
        self.params = params if params is not None else {}
        self.global_outputs = AttrDict(global_outputs or {})


class ParallelGateway(Element):
    """Runs every outgoing branch; the branches meet again at a `ConvergeGateway`."""

    NODE_TYPE = "ParallelGateway"


class ConvergeGateway(Element):
    """Waits for the branches of a parallel or conditional parallel gateway."""

    NODE_TYPE = "ConvergeGateway"


ConditionKey = int | Element | str
"""Which outgoing branch a condition belongs to: its index in ``outgoing`` (as in bamboo), the
element the branch leads to, or that element's id."""


class ConditionGateway(Element):
    """A gateway that chooses branches by boolean expressions (boolrule syntax)."""

    def __init__(
        self,
        conditions: Mapping[ConditionKey, str] | None = None,
        default_condition_outgoing: ConditionKey | None = None,
        id: str | None = None,
        name: str | None = None,
        outgoing: list[Element] | None = None,
    ) -> None:
        super().__init__(id=id, name=name, outgoing=outgoing)
        self.conditions: dict[ConditionKey, str] = dict(conditions or {})
        self.default_condition_outgoing = default_condition_outgoing

    def add_condition(self, index: ConditionKey, evaluate: str) -> None:
        self.conditions[index] = evaluate

    def _branch_index(self, key: ConditionKey) -> int:
        if isinstance(key, int):
            if not 0 <= key < len(self.outgoing):
                raise ValueError(
                    f"{self.type()} {self.id}: branch index {key} is out of range "
                    f"(it has {len(self.outgoing)} outgoing branches)"
                )
            return key
        target_id = key.id if isinstance(key, Element) else key
        for index, target in enumerate(self.outgoing):
            if target.id == target_id:
                return index
        raise ValueError(f"{self.type()} {self.id}: no outgoing branch leads to {target_id}")

    def link_conditions_with(self, outgoing: Sequence[str]) -> dict[str, dict[str, str]]:
        """The ``conditions`` of the tree node: ``{flow_id: {"evaluate": expression}}``."""
        expressions: dict[int, str] = {}
        for key, expression in self.conditions.items():
            expressions[self._branch_index(key)] = expression
        default_index = self._default_index()
        for index, target in enumerate(self.outgoing):
            if index not in expressions and index != default_index:
                raise ValueError(
                    f"{self.type()} {self.id}: the branch to {target.id} has no condition and is not the default branch"
                )
        return {outgoing[index]: {"evaluate": expressions[index]} for index in sorted(expressions)}

    def link_default_condition_with(self, outgoing: Sequence[str]) -> dict[str, str]:
        """The ``default_condition`` of the tree node: ``{"flow_id": ...}``, or ``{}`` if none."""
        default_index = self._default_index()
        return {} if default_index is None else {"flow_id": outgoing[default_index]}

    def _default_index(self) -> int | None:
        if self.default_condition_outgoing is None:
            return None
        return self._branch_index(self.default_condition_outgoing)


class ExclusiveGateway(ConditionGateway):
    """Takes the one branch whose condition is true, or the default branch."""

    NODE_TYPE = "ExclusiveGateway"


class ConditionalParallelGateway(ConditionGateway):
    """Takes every branch whose condition is true (or the default); they meet at a converge gateway."""

    NODE_TYPE = "ConditionalParallelGateway"


# --- the tree --------------------------------------------------------------------------------------

# Node types whose `incoming` is always a list, even with one flow (bamboo's convention).
_LIST_INCOMING: frozenset[type[Element]] = frozenset(
    {
        ServiceActivity,
        SubProcess,
        EmptyEndEvent,
        ExecutableEndEvent,
        ParallelGateway,
        ConditionalParallelGateway,
        ExclusiveGateway,
        ConvergeGateway,
    }
)
_BRANCHING: tuple[type[Element], ...] = (ParallelGateway, ConditionGateway)
_END_EVENTS: tuple[type[Element], ...] = (EmptyEndEvent, ExecutableEndEvent)


def _reachable(start: Element, ids_in_tree: dict[str, Element]) -> list[Element]:
    """Elements reachable from `start`, breadth first (bamboo's order); checks ids are unique."""
    order: list[Element] = []
    seen: set[str] = set()
    queue: deque[Element] = deque([start])
    while queue:
        element = queue.popleft()
        owner = ids_in_tree.setdefault(element.id, element)
        if owner is not element:
            raise ValueError(f"two elements share the id {element.id!r}: {owner!r} and {element!r}")
        if element.id in seen:
            continue
        seen.add(element.id)
        order.append(element)
        queue.extend(element.outgoing)
    return order


def _incoming_value(element: Element, flow_ids: list[str]) -> str | list[str]:
    if any(isinstance(element, kind) for kind in _LIST_INCOMING):
        return list(flow_ids)
    if len(flow_ids) > 1:
        return list(flow_ids)
    return flow_ids[0] if flow_ids else ""


def _single_outgoing(element: Element, flow_ids: list[str]) -> str:
    if len(flow_ids) > 1:
        raise ValueError(
            f"{element.type()} {element.id} has {len(flow_ids)} outgoing connections; only gateways "
            "may branch (put a ParallelGateway or ExclusiveGateway after it)"
        )
    return flow_ids[0] if flow_ids else ""


def build_tree(
    start_elem: EmptyStartEvent, id: str | None = None, data: Data | Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The bamboo pipeline tree of everything reachable from `start_elem`.

    `id` defaults to a fresh ``p...`` id; `data` (a `Data` or an already-built dict) defaults to
    ``{"inputs": {}, "outputs": []}``.
    """
    return _build(start_elem, id, data, ids_in_tree={})


def _build(
    start_elem: Element,
    tree_id: str | None,
    data: Data | Mapping[str, Any] | None,
    ids_in_tree: dict[str, Element],
) -> dict[str, Any]:
    if not isinstance(start_elem, EmptyStartEvent):
        raise TypeError(f"a tree starts with an EmptyStartEvent, not {start_elem!r}")
    elements = _reachable(start_elem, ids_in_tree)

    flows: dict[str, dict[str, Any]] = {}
    incoming: dict[str, list[str]] = {element.id: [] for element in elements}
    outgoing: dict[str, list[str]] = {element.id: [] for element in elements}
    for element in elements:
        for target in element.outgoing:
            flow_id = _unique_id("f")
            flows[flow_id] = {"is_default": False, "source": element.id, "target": target.id, "id": flow_id}
            outgoing[element.id].append(flow_id)
            incoming[target.id].append(flow_id)

    tree: dict[str, Any] = {
        "id": tree_id or _unique_id("p"),
        "start_event": None,
        "end_event": None,
        "activities": {},
        "gateways": {},
        "flows": flows,
        "data": _data_dict(data),
    }
    for element in elements:
        flows_in = _incoming_value(element, incoming[element.id])
        flows_out = outgoing[element.id]
        if isinstance(element, EmptyStartEvent):
            if element is not start_elem:
                raise ValueError(f"a second start event {element.id} is reachable from {start_elem.id}")
            tree["start_event"] = {
                "incoming": flows_in,
                "outgoing": _single_outgoing(element, flows_out),
                "type": element.type(),
                "id": element.id,
                "name": element.name,
            }
        elif isinstance(element, _END_EVENTS):
            if tree["end_event"] is not None:
                raise ValueError(
                    f"a pipeline has one end event, but {tree['end_event']['id']} and {element.id} are reachable"
                )
            if flows_out:
                raise ValueError(f"end event {element.id} cannot have outgoing connections")
            tree["end_event"] = {
                "incoming": flows_in,
                "outgoing": "",
                "type": element.type(),
                "id": element.id,
                "name": element.name,
            }
        elif isinstance(element, ServiceActivity):
            activity: dict[str, Any] = {
                "incoming": flows_in,
                "outgoing": _single_outgoing(element, flows_out),
                "type": element.type(),
                "id": element.id,
                "name": element.name,
                "error_ignorable": element.error_ignorable,
                "timeout": element.timeout,
                "skippable": element.skippable,
                "retryable": element.retryable,
                "component": element.component_dict(),
                "optional": False,
            }
            if element.timeout_config is not None:
                activity["timeout_config"] = copy.deepcopy(element.timeout_config)
            if element.auto_retry is not None:
                activity["auto_retry"] = copy.deepcopy(element.auto_retry)
            tree["activities"][element.id] = activity
        elif isinstance(element, SubProcess):
            if element.start is None:
                raise ValueError(f"SubProcess {element.id} has no start event")
            params = element.params.to_dict() if isinstance(element.params, Params) else element.params
            tree["activities"][element.id] = {
                "id": element.id,
                "incoming": flows_in,
                "name": element.name,
                "outgoing": _single_outgoing(element, flows_out),
                "type": element.type(),
                "params": {key: _var_dict(value) for key, value in params.items()},
                "pipeline": _build(element.start, element.id, element.data, ids_in_tree),
            }
        elif isinstance(element, ConditionGateway):
            tree["gateways"][element.id] = {
                "id": element.id,
                "incoming": flows_in,
                "outgoing": list(flows_out),
                "type": element.type(),
                "name": element.name,
                "conditions": element.link_conditions_with(flows_out),
                "default_condition": element.link_default_condition_with(flows_out),
            }
        elif isinstance(element, _BRANCHING):
            tree["gateways"][element.id] = {
                "id": element.id,
                "incoming": flows_in,
                "outgoing": list(flows_out),
                "type": element.type(),
                "name": element.name,
            }
        elif isinstance(element, ConvergeGateway):
            tree["gateways"][element.id] = {
                "id": element.id,
                "incoming": flows_in,
                "outgoing": _single_outgoing(element, flows_out),
                "type": element.type(),
                "name": element.name,
            }
        else:
            raise TypeError(f"cannot put {element!r} in a pipeline tree")
    return tree


def _data_dict(data: Data | Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(data, Data):
        return data.to_dict()
    if data:
        return copy.deepcopy(dict(data))
    return {"inputs": {}, "outputs": []}
