"""The data the flow semantics work on: parsed trees, node attempts, pipeline snapshots.

Everything here is immutable. `decide` returns new values; the server applies them.
Times are integer milliseconds since the Unix epoch, handed in by the caller (the core has no clock).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine_server.core.frozen import fast_init


class NodeState(enum.Enum):
    READY = "READY"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    REVOKED = "REVOKED"


class PipelineState(enum.Enum):
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    REVOKED = "REVOKED"


FINAL_PIPELINE_STATES = frozenset({PipelineState.FINISHED, PipelineState.REVOKED})


class NodeType(enum.Enum):
    """Node types of the bamboo pipeline tree (the value is the tree's `type` string)."""

    EMPTY_START_EVENT = "EmptyStartEvent"
    EMPTY_END_EVENT = "EmptyEndEvent"
    EXECUTABLE_END_EVENT = "ExecutableEndEvent"
    SERVICE_ACTIVITY = "ServiceActivity"
    SUBPROCESS = "SubProcess"
    EXCLUSIVE_GATEWAY = "ExclusiveGateway"
    PARALLEL_GATEWAY = "ParallelGateway"
    CONDITIONAL_PARALLEL_GATEWAY = "ConditionalParallelGateway"
    CONVERGE_GATEWAY = "ConvergeGateway"


DIVERGING_GATEWAYS = frozenset(
    {NodeType.EXCLUSIVE_GATEWAY, NodeType.PARALLEL_GATEWAY, NodeType.CONDITIONAL_PARALLEL_GATEWAY}
)
FORKING_GATEWAYS = frozenset({NodeType.PARALLEL_GATEWAY, NodeType.CONDITIONAL_PARALLEL_GATEWAY})
END_EVENTS = frozenset({NodeType.EMPTY_END_EVENT, NodeType.EXECUTABLE_END_EVENT})
# Nodes that become tasks for workers; everything else the engine evaluates itself.
TASK_NODES = frozenset({NodeType.SERVICE_ACTIVITY, NodeType.EXECUTABLE_END_EVENT})


@fast_init
@dataclass(frozen=True, slots=True)
class VarSpec:
    """One variable of `data.inputs`, a component's inputs or a subprocess's params, as written in the tree."""

    type: str  # "plain" | "splice" | "lazy"
    value: Any
    custom_type: str = ""
    # Node-output reference: (node id, output key) pairs; several for the rewritable list form.
    sources: tuple[tuple[str, str], ...] = ()
    # A subprocess input that its parent's params may set (bamboo's DataInput).
    is_param: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class FlowSpec:
    id: str
    source: str
    target: str
    is_default: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str
    type: NodeType
    name: str = ""
    incoming: tuple[str, ...] = ()
    outgoing: tuple[str, ...] = ()
    component_code: str = ""
    component_version: str = "legacy"
    inputs: Mapping[str, VarSpec] = field(default_factory=dict)
    error_ignorable: bool = False
    skippable: bool = True
    retryable: bool = True
    # auto_retry: how many times a failure retries by itself (0 = never).
    auto_retry_times: int = 0
    auto_retry_interval_ms: int = 0
    # timeout_config: fail the attempt after this long (0 = never), then maybe skip it.
    timeout_ms: int = 0
    timeout_skips: bool = False
    # Exclusive / conditional parallel gateways: outgoing flow id -> condition text, and the default flow.
    conditions: Mapping[str, str] = field(default_factory=dict)
    default_flow: str = ""
    # SubProcess: the nested tree and the params rendered in the parent that become its inputs.
    subprocess: PipelineSpec | None = None
    params: Mapping[str, VarSpec] = field(default_factory=dict)


@fast_init
@dataclass(frozen=True, slots=True)
class PipelineSpec:
    id: str
    start_event_id: str
    end_event_id: str
    nodes: Mapping[str, NodeSpec]
    flows: Mapping[str, FlowSpec]
    inputs: Mapping[str, VarSpec]
    outputs: tuple[str, ...] = ()
    pre_render_keys: tuple[str, ...] = ()
    # Filled in on the root only, for the whole tree (subprocesses included):
    index: TreeIndex | None = None

    def next_node_ids(self, node_id: str) -> list[str]:
        return [self.flows[flow_id].target for flow_id in self.nodes[node_id].outgoing]

    @property
    def tree(self) -> TreeIndex:
        assert self.index is not None, "only the root spec carries the tree index"
        return self.index


@fast_init
@dataclass(frozen=True, slots=True)
class TreeIndex:
    """Lookups over a whole tree. Node ids are unique across all levels, so one map serves them all."""

    nodes: Mapping[str, NodeSpec]
    # node id -> id of the SubProcess node whose pipeline holds it ("" for the root pipeline)
    scope_of: Mapping[str, str]
    # scope id -> the pipeline spec of that scope ("" -> the root)
    scopes: Mapping[str, PipelineSpec]
    flows: Mapping[str, FlowSpec]
    # parallel / conditional parallel gateway id -> the converge gateway that joins its branches
    converge_of: Mapping[str, str]
    # node id -> (scope, variable key, output key) for each node-output variable the node writes
    output_refs: Mapping[str, tuple[tuple[str, str, str], ...]]


@fast_init
@dataclass(frozen=True, slots=True)
class NodeRun:
    """The current attempt of one node. Earlier attempts are kept as history rows of the same shape."""

    node_id: str
    state: NodeState
    version: str
    loop: int = 1
    inner_loop: int = 1
    retry: int = 0
    skip: bool = False
    error_ignored: bool = False
    schedule_times: int = 0
    awaiting_callback: bool = False
    started_at: int = 0
    finished_at: int = 0
    inputs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict)
    # The path's open forks (parallel gateway ids, innermost last), within the node's own pipeline level.
    forks: tuple[str, ...] = ()
    # Version of the enclosing SubProcess attempt the node was entered under ("" at the root): how
    # inner_loop knows a new subprocess entry began.
    scope_entry: str = ""


@fast_init
@dataclass(frozen=True, slots=True)
class Join:
    """Arrivals at a fork's converge gateway so far."""

    expected: int
    arrived: int = 0


@fast_init
@dataclass(frozen=True, slots=True)
class Snapshot:
    """All the engine knows about one pipeline: its tree, its state, its nodes' current attempts."""

    pipeline_id: str
    spec: PipelineSpec
    state: PipelineState
    nodes: Mapping[str, NodeRun]
    # Variable values per pipeline level (scope id "" is the root), keyed as in the tree ("${name}").
    # Splice variables that are not pre-rendered are absent: they are rendered from the tree when used.
    contexts: Mapping[str, Mapping[str, Any]]
    # Counter from which node attempt versions are made; never reused within a pipeline.
    version_seq: int = 0
    started_at: int = 0
    finished_at: int = 0
    # Open joins by fork gateway id.
    joins: Mapping[str, Join] = field(default_factory=dict)
    # The values Start was given; visible at every level unless a level defines the same key.
    presets: Mapping[str, Any] = field(default_factory=dict)
    # The root's data.outputs, once the pipeline finished.
    outputs: Mapping[str, Any] = field(default_factory=dict)
    # How many times one node may be entered (loops).
    rerun_limit: int = 100
    # Nodes whose current attempt is FAILED (derived; saves scanning every node after every event).
    failed_count: int = 0
    # Paths stopped by a pause (pipeline, subprocess or node appointment): (node id, forks), resumed later.
    parked: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Callback data that arrived while the node's worker was still busy with an earlier one.
    callbacks: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # A component run once when the pipeline first fails: its code, and how its run went.
    failure_handler: FailureHandler | None = None


# The task of a pipeline's failure handler belongs to no node of the tree.
FAILURE_HANDLER_NODE = ""
FAILURE_HANDLER_VERSION = "failure-handler"


@fast_init
@dataclass(frozen=True, slots=True)
class FailureHandler:
    code: str
    state: str = ""  # "" (not run), RUNNING, FINISHED or FAILED
    outputs: Mapping[str, Any] = field(default_factory=dict)
