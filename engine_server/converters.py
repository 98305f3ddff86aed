"""The one place that converts between the engine's values and protobuf messages."""

from __future__ import annotations

from engine_api.engine.v1 import engine_pb2, types_pb2, worker_pb2
from engine_server.core.model import NodeRun, NodeState, NodeType, PipelineState
from engine_server.engine import ClaimedTask, PipelineView
from engine_server.records import dumps, reach_order

NODE_STATES = {state: types_pb2.NodeState.Value(f"NODE_STATE_{state.value}") for state in NodeState}
PIPELINE_STATES = {state: types_pb2.PipelineState.Value(f"PIPELINE_STATE_{state.value}") for state in PipelineState}
PIPELINE_STATES_BY_NUMBER = {number: state for state, number in PIPELINE_STATES.items()}


def task_message(task: ClaimedTask) -> worker_pb2.Task:
    return worker_pb2.Task(
        task_id=task.task_id,
        token=task.token,
        pipeline_id=task.pipeline_id,
        node_id=task.node_id,
        node_version=task.node_version,
        component_code=task.component_code,
        component_version=task.component_version,
        kind=types_pb2.TaskKind.ValueType(task.kind),  # storage uses the protocol's numbers
        inputs_json=task.inputs_json,
        outputs_json=task.outputs_json,
        callback_data_json=task.callback_data_json,
        attempt=task.attempt,
        loop=task.loop,
        inner_loop=task.inner_loop,
        retry=task.retry,
        schedule_times=task.schedule_times,
        lease_deadline_unix_ms=task.lease_deadline,
    )


def _state_node(run: NodeRun, node_type: NodeType, name: str) -> engine_pb2.StateNode:
    return engine_pb2.StateNode(
        id=run.node_id,
        type=node_type.value,
        name=name,
        state=run.state.value,
        version=run.version,
        loop=run.loop,
        inner_loop=run.inner_loop,
        retry=run.retry,
        skip=run.skip,
        error_ignored=run.error_ignored,
        schedule_times=run.schedule_times,
        started_unix_ms=run.started_at,
        finished_unix_ms=run.finished_at,
    )


def state_tree(view: PipelineView) -> engine_pb2.GetStateResponse:
    root = engine_pb2.StateNode(
        id=view.pipeline_id,
        type="Pipeline",
        name=view.name,
        state=view.state.value,
        loop=1,
        inner_loop=1,
        started_unix_ms=view.created_at,
        finished_unix_ms=view.finished_at,
    )
    tree = view.spec.tree
    runs = {run.node_id: run for run in view.nodes if run.node_id in tree.nodes}
    # Each level's nodes nest under their SubProcess node, in the order they were reached.
    children: dict[str, list[str]] = {}
    for run in sorted(runs.values(), key=reach_order):
        children.setdefault(tree.scope_of[run.node_id], []).append(run.node_id)

    def build(node_id: str) -> engine_pb2.StateNode:
        spec = tree.nodes[node_id]
        message = _state_node(runs[node_id], spec.type, spec.name)
        message.children.extend(build(child) for child in children.get(node_id, []))
        return message

    root.children.extend(build(node_id) for node_id in children.get("", []))
    return engine_pb2.GetStateResponse(
        root=root,
        pipeline_state=PIPELINE_STATES[view.state],
        outputs_json=dumps(view.outputs),
        failure_handler_json=dumps(view.failure_handler) if view.failure_handler else "",
    )


def node_data(pipeline_id: str, run: NodeRun) -> engine_pb2.NodeData:
    ex_data = run.outputs.get("ex_data", "") if run.state is NodeState.FAILED or run.error_ignored else ""
    return engine_pb2.NodeData(
        pipeline_id=pipeline_id,
        node_id=run.node_id,
        version=run.version,
        state=NODE_STATES[run.state],
        inputs_json=dumps(run.inputs),
        outputs_json=dumps(run.outputs),
        ex_data=ex_data if isinstance(ex_data, str) else dumps(ex_data),
    )


def node_history(run: NodeRun) -> engine_pb2.NodeHistory:
    return engine_pb2.NodeHistory(
        version=run.version,
        state=NODE_STATES[run.state],
        loop=run.loop,
        inner_loop=run.inner_loop,
        retry=run.retry,
        skip=run.skip,
        error_ignored=run.error_ignored,
        started_unix_ms=run.started_at,
        finished_unix_ms=run.finished_at,
        inputs_json=dumps(run.inputs),
        outputs_json=dumps(run.outputs),
    )
