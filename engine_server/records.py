"""Conversions between database rows and the core's models, and the parsed-tree cache."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from engine_server.core.model import FailureHandler, Join, NodeRun, NodeState, PipelineSpec, PipelineState, Snapshot
from engine_server.core.tree import parse_tree

# One encoder for every write: json.dumps with options builds a new JSONEncoder per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(value: Any) -> str:
    if type(value) is dict and not value:
        return "{}"  # most outputs and many inputs: not worth the encoder
    return _encode(value)


class SpecCache:
    """Parsed trees by content: many pipelines of one tree share one immutable PipelineSpec.

    Small on purpose. A pipeline in the engine's cache holds its own spec; this cache serves trees started
    again (templates, retried starts: kept while they come back within the last 256 trees) and pipelines
    reloaded from the database (those re-parse more often now). Most trees are new (bamboo users build each
    with fresh ids), and every spec kept past its pipeline's end is a graph of live objects the garbage
    collector walks: under `sustained` (20 s phases, two interleaved pairs of runs), 2,000 entries made the
    server's collections pause up to 46-52 ms (173-201 ms in all), 200 entries up to 12-16 ms (38-47 ms).
    """

    def __init__(self, capacity: int = 256) -> None:
        self._specs: OrderedDict[tuple[str, bool], PipelineSpec] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def find(self, tree_json: str, *, cycle_tolerate: bool) -> PipelineSpec | None:
        key = (hashlib.blake2b(tree_json.encode(), digest_size=16).hexdigest(), cycle_tolerate)
        with self._lock:
            spec = self._specs.get(key)
            if spec is not None:
                self._specs.move_to_end(key)
            return spec

    def get(self, tree_json: str, *, cycle_tolerate: bool) -> PipelineSpec:
        spec = self.find(tree_json, cycle_tolerate=cycle_tolerate)
        if spec is not None:
            return spec
        spec = parse_tree(json.loads(tree_json), cycle_tolerate=cycle_tolerate)
        self.put(tree_json, spec, cycle_tolerate=cycle_tolerate)
        return spec

    def put(self, tree_json: str, spec: PipelineSpec, *, cycle_tolerate: bool) -> None:
        key = (hashlib.blake2b(tree_json.encode(), digest_size=16).hexdigest(), cycle_tolerate)
        with self._lock:
            self._specs[key] = spec
            while len(self._specs) > self._capacity:
                self._specs.popitem(last=False)


def reach_order(run: NodeRun) -> tuple[bool, int, int]:
    """Nodes in the order they were reached: by start time, then by version (versions are "v<seq>").

    A node with a state but no start time (appointed to pause, not reached yet) comes after every reached one.
    """
    sequence = int(run.version[1:]) if run.version[1:].isdigit() else 0
    return run.started_at == 0, run.started_at, sequence


def node_from_row(row: Any) -> NodeRun:
    return NodeRun(
        node_id=row.node_id,
        state=NodeState(row.state),
        version=row.version,
        loop=row.loop,
        inner_loop=row.inner_loop,
        retry=row.retry,
        skip=row.skip,
        error_ignored=row.error_ignored,
        # History rows keep no live-only fields.
        schedule_times=getattr(row, "schedule_times", 0),
        awaiting_callback=getattr(row, "awaiting_callback", False),
        started_at=row.started_at,
        finished_at=row.finished_at,
        inputs=json.loads(row.inputs_json),
        outputs=json.loads(row.outputs_json),
        forks=tuple(row.forks.split(",")) if getattr(row, "forks", "") else (),
        scope_entry=getattr(row, "scope_entry", ""),
    )


def node_row(pipeline_id: str, run: NodeRun, *, inputs_json: str | None = None) -> dict[str, Any]:
    return {
        "pipeline_id": pipeline_id,
        "node_id": run.node_id,
        "state": run.state.value,
        "version": run.version,
        "loop": run.loop,
        "inner_loop": run.inner_loop,
        "retry": run.retry,
        "skip": run.skip,
        "error_ignored": run.error_ignored,
        "schedule_times": run.schedule_times,
        "awaiting_callback": run.awaiting_callback,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "inputs_json": inputs_json if inputs_json is not None else dumps(run.inputs),
        "outputs_json": dumps(run.outputs),
        "forks": ",".join(run.forks),
        "scope_entry": run.scope_entry,
    }


def history_row(pipeline_id: str, run: NodeRun) -> dict[str, Any]:
    row = node_row(pipeline_id, run)
    for live_only in ("schedule_times", "awaiting_callback", "forks", "scope_entry"):
        del row[live_only]
    return row


def runtime_json(snapshot: Snapshot) -> str:
    return dumps(
        {
            "contexts": snapshot.contexts,
            "joins": {fork: [join.expected, join.arrived] for fork, join in snapshot.joins.items()},
            "presets": snapshot.presets,
            "outputs": snapshot.outputs,
            "parked": [[node_id, list(forks)] for node_id, forks in snapshot.parked],
            "callbacks": {node_id: list(queued) for node_id, queued in snapshot.callbacks.items()},
            "failure_handler": failure_handler_json(snapshot.failure_handler),
        }
    )


def failure_handler_json(handler: FailureHandler | None) -> dict[str, Any] | None:
    if handler is None:
        return None
    return {"code": handler.code, "state": handler.state, "outputs": handler.outputs}


def failure_handler_from(value: Any) -> FailureHandler | None:
    if not value:
        return None
    return FailureHandler(value["code"], value.get("state", ""), value.get("outputs", {}))


def snapshot_from_rows(pipeline: Any, nodes: Sequence[Any], spec: PipelineSpec, *, rerun_limit: int) -> Snapshot:
    runtime = json.loads(pipeline.runtime_json)
    runs = {row.node_id: node_from_row(row) for row in nodes}
    return Snapshot(
        pipeline_id=pipeline.id,
        spec=spec,
        state=PipelineState(pipeline.state),
        nodes=runs,
        contexts=runtime.get("contexts", {}),
        version_seq=pipeline.version_seq,
        started_at=pipeline.created_at,
        finished_at=pipeline.finished_at,
        joins={fork: Join(expected, arrived) for fork, (expected, arrived) in runtime.get("joins", {}).items()},
        presets=runtime.get("presets", {}),
        outputs=runtime.get("outputs", {}),
        rerun_limit=rerun_limit,
        failed_count=sum(run.state is NodeState.FAILED for run in runs.values()),
        parked=tuple((node_id, tuple(forks)) for node_id, forks in runtime.get("parked", [])),
        callbacks={node_id: tuple(queued) for node_id, queued in runtime.get("callbacks", {}).items()},
        failure_handler=failure_handler_from(runtime.get("failure_handler")),
    )


def parse_json_object(text: str, what: str) -> Mapping[str, Any]:
    """Parses a JSON object payload; raises ValueError with a message naming the field."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value
