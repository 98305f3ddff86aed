"""The data the flow semantics work on: parsed trees, node attempts, pipeline snapshots.

Everything here is immutable. `decide` returns new values; the server applies them.
Times are integer milliseconds since the Unix epoch, handed in by the caller (the core has no clock).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True, slots=True)
class VarSpec:
    """One variable of `data.inputs` or of a component's inputs, as written in the tree."""

    type: str  # "plain" | "splice" | "lazy"
    value: Any
    custom_type: str = ""


@dataclass(frozen=True, slots=True)
class FlowSpec:
    id: str
    source: str
    target: str
    is_default: bool = False


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


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    id: str
    start_event_id: str
    end_event_id: str
    nodes: Mapping[str, NodeSpec]
    flows: Mapping[str, FlowSpec]
    inputs: Mapping[str, VarSpec]
    outputs: tuple[str, ...] = ()

    def next_node_ids(self, node_id: str) -> list[str]:
        return [self.flows[flow_id].target for flow_id in self.nodes[node_id].outgoing]


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


@dataclass(frozen=True, slots=True)
class Snapshot:
    """All the engine knows about one pipeline: its tree, its state, its nodes' current attempts."""

    pipeline_id: str
    spec: PipelineSpec
    state: PipelineState
    nodes: Mapping[str, NodeRun]
    # Rendered root variables, keyed as in the tree ("${name}").
    context: Mapping[str, Any]
    # Counter from which node attempt versions are made; never reused within a pipeline.
    version_seq: int = 0
    started_at: int = 0
    finished_at: int = 0
