"""The SDK's only contact with generated protobuf code.

Requests are built from plain Python values, responses are converted to the SDK's dataclasses or
to plain dicts, and every `grpc.RpcError` becomes a typed `EngineError` here. JSON payload fields
are encoded compactly and without ASCII escaping, so non-ASCII text stays readable and small.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc

from engine_api.engine.v1 import engine_pb2, engine_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc
from worker_sdk._models import HeartbeatReply, Task
from worker_sdk.context import TaskKind
from worker_sdk.errors import from_rpc_error

Metadata: TypeAlias = Sequence[tuple[str, str]]
ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]

_NODE_STATE_PREFIX = "NODE_STATE_"
_PIPELINE_STATE_PREFIX = "PIPELINE_STATE_"


# --- JSON payloads ---------------------------------------------------------------------------------


def encode_json(value: Any) -> str:
    """Raises TypeError or ValueError when `value` is not JSON-serialisable."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def decode_json(text: str, *, default: Any = None) -> Any:
    """Empty text means "not set" in proto3, so it decodes to `default`."""
    return json.loads(text) if text else default


def decode_json_object(text: str, what: str) -> dict[str, Any]:
    value = decode_json(text, default={})
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _decode_json_object_or_text(text: str) -> Any:
    """For data the SDK only hands back to the caller: a malformed payload is shown, not fatal."""
    try:
        return decode_json(text, default={})
    except ValueError:
        return text


# --- time and enums --------------------------------------------------------------------------------


def _seconds(unix_ms: int) -> float | None:
    return unix_ms / 1000.0 if unix_ms else None


def _datetime(unix_ms: int) -> datetime | None:
    return datetime.fromtimestamp(unix_ms / 1000.0, tz=UTC) if unix_ms else None


def _elapsed(started_ms: int, finished_ms: int) -> float | None:
    """Seconds between start and finish, or until now while still going (as bamboo reports it)."""
    if not started_ms:
        return None
    end_ms = finished_ms or int(time.time() * 1000)
    return max(0.0, (end_ms - started_ms) / 1000.0)


def _node_state_name(value: int) -> str | None:
    if value == types_pb2.NODE_STATE_UNSPECIFIED:
        return None
    try:
        return types_pb2.NodeState.Name(value).removeprefix(_NODE_STATE_PREFIX)  # type: ignore[arg-type]
    except ValueError:
        return str(value)


def _pipeline_state_name(value: int) -> str | None:
    if value == types_pb2.PIPELINE_STATE_UNSPECIFIED:
        return None
    try:
        return types_pb2.PipelineState.Name(value).removeprefix(_PIPELINE_STATE_PREFIX)  # type: ignore[arg-type]
    except ValueError:
        return str(value)


def pipeline_state_value(name: str) -> types_pb2.PipelineState.ValueType:
    """``"RUNNING"`` -> PIPELINE_STATE_RUNNING."""
    full_name = name.upper()
    if not full_name.startswith(_PIPELINE_STATE_PREFIX):
        full_name = _PIPELINE_STATE_PREFIX + full_name
    try:
        return types_pb2.PipelineState.Value(full_name)
    except ValueError:
        known = [n.removeprefix(_PIPELINE_STATE_PREFIX) for n in types_pb2.PipelineState.keys()[1:]]
        raise ValueError(f"unknown pipeline state {name!r}; expected one of {', '.join(known)}") from None


# --- channels --------------------------------------------------------------------------------------


def _channel_options(options: ChannelOptions, max_reconnect_backoff: float) -> list[tuple[str, Any]]:
    """The SDK's channel defaults, with the caller's options winning.

    gRPC's own reconnect backoff grows to two minutes; during that time every call fails at once
    with UNAVAILABLE even after the server is back, so it is capped to match the SDK's backoff.
    """
    defaults: dict[str, Any] = {
        # A poll or stream message may carry several tasks, each with inputs up to the server's payload limit.
        "grpc.max_receive_message_length": -1,
        # A task stream is long-lived and often idle: keepalive pings notice a connection that was dropped
        # silently (a load balancer, NAT) instead of waiting for tasks on it forever.
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": max(100, int(max_reconnect_backoff * 1000)),
    }
    return list({**defaults, **dict(options)}.items())


def open_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: ChannelOptions = (),
    max_reconnect_backoff: float = 10.0,
) -> grpc.Channel:
    """A channel that notices a restarted server quickly (see `_channel_options`)."""
    channel_options = _channel_options(options, max_reconnect_backoff)
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=channel_options)
    return grpc.insecure_channel(target, options=channel_options)


def open_aio_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: ChannelOptions = (),
    max_reconnect_backoff: float = 10.0,
) -> grpc.aio.Channel:
    """`open_channel` for asyncio; call it on the event loop that will use the channel."""
    channel_options = _channel_options(options, max_reconnect_backoff)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=channel_options)
    return grpc.aio.insecure_channel(target, options=channel_options)


class _Caller:
    def __init__(self, metadata: Metadata) -> None:
        self._metadata = tuple(metadata)

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error


# --- worker side -----------------------------------------------------------------------------------


def task_from_proto(message: worker_pb2.Task) -> Task:
    problems: list[str] = []

    def read(text: str, what: str, *, want_object: bool) -> Any:
        try:
            return decode_json_object(text, what) if want_object else decode_json(text)
        except ValueError as error:
            problems.append(f"{what} is not valid JSON: {error}")
            return {} if want_object else None

    inputs = read(message.inputs_json, "inputs", want_object=True)
    outputs = read(message.outputs_json, "kept outputs", want_object=True)
    callback_data = read(message.callback_data_json, "callback data", want_object=False)
    kind = TaskKind.SCHEDULE if message.kind == types_pb2.TASK_KIND_SCHEDULE else TaskKind.EXECUTE
    return Task(
        task_id=message.task_id,
        token=message.token,
        pipeline_id=message.pipeline_id,
        node_id=message.node_id,
        node_version=message.node_version,
        component_code=message.component_code,
        # An unset version is the bamboo default, as in the builder.
        component_version=message.component_version or "legacy",
        kind=kind,
        inputs=inputs,
        attempt=message.attempt,
        loop=message.loop,
        inner_loop=message.inner_loop,
        retry=message.retry,
        schedule_times=message.schedule_times,
        callback_data=callback_data,
        outputs=outputs,
        lease_deadline=_seconds(message.lease_deadline_unix_ms),
        payload_error="; ".join(problems) or None,
    )


class PollCall:
    """A long poll in flight; `cancel` ends it early (when the worker stops)."""

    def __init__(self, future: Any) -> None:
        self._future = future

    def cancel(self) -> None:
        self._future.cancel()

    def result(self) -> list[Task]:
        """The claimed tasks; empty if the poll timed out on the server or was cancelled."""
        try:
            response: worker_pb2.PollTasksResponse = self._future.result()
        except grpc.FutureCancelledError:
            return []
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                return []
            raise from_rpc_error(error) from error
        return [task_from_proto(task) for task in response.tasks]


class WorkerTransport(_Caller):
    def __init__(self, channel: grpc.Channel, metadata: Metadata = ()) -> None:
        super().__init__(metadata)
        self._stub = worker_pb2_grpc.WorkerServiceStub(channel)

    @property
    def stub(self) -> worker_pb2_grpc.WorkerServiceStub:
        return self._stub

    @property
    def metadata(self) -> Metadata:
        return self._metadata

    def poll(
        self, *, worker_id: str, component_codes: Sequence[str], max_tasks: int, wait_ms: int, timeout: float
    ) -> PollCall:
        request = worker_pb2.PollTasksRequest(
            worker_id=worker_id, component_codes=component_codes, max_tasks=max_tasks, wait_ms=wait_ms
        )
        return PollCall(self._stub.PollTasks.future(request, timeout=timeout, metadata=self._metadata))

    def heartbeat(self, token: str, *, progress_json: str = "", timeout: float) -> HeartbeatReply:
        request = worker_pb2.HeartbeatRequest(token=token, progress_json=progress_json)
        response = self.send_report("heartbeat", request, timeout)
        return HeartbeatReply(
            lease_deadline=_seconds(response.lease_deadline_unix_ms),
            cancel_requested=response.cancel_requested,
            cancel_reason=response.cancel_reason,
        )

    # Reports ("complete", "fail" or "heartbeat" and its request) go out here; a streaming transport
    # overrides both to use its stream while it has one.

    def send_report(self, kind: str, request: Any, timeout: float) -> Any:
        """Sends a report as its unary call; returns the response."""
        return self._unary(getattr(self._stub, _REPORT_METHODS[kind]), request, timeout)

    async def send_report_async(
        self, kind: str, request: Any, timeout: float, pool: concurrent.futures.Executor
    ) -> Any:
        """`send_report` for the worker's event loop: the blocking unary call runs on `pool`."""
        return await asyncio.get_running_loop().run_in_executor(pool, self.send_report, kind, request, timeout)


_REPORT_METHODS = {"complete": "CompleteTask", "fail": "FailTask", "heartbeat": "Heartbeat"}


def complete_request(
    token: str, *, outputs: Mapping[str, Any], poll_after_ms: int = 0, await_callback: bool = False
) -> worker_pb2.CompleteTaskRequest:
    """Raises TypeError / ValueError when the outputs are not JSON-serialisable."""
    return worker_pb2.CompleteTaskRequest(
        token=token,
        outputs_json=encode_json(dict(outputs)),
        poll_after_ms=poll_after_ms,
        await_callback=await_callback,
    )


def fail_request(
    token: str,
    *,
    error_message: str,
    retryable: bool = False,
    retry_after_ms: int = 0,
    outputs: Mapping[str, Any] | None = None,
) -> worker_pb2.FailTaskRequest:
    return worker_pb2.FailTaskRequest(
        token=token,
        error_message=error_message,
        retryable=retryable,
        retry_after_ms=retry_after_ms,
        outputs_json=encode_json(dict(outputs)) if outputs else "",
    )


# --- client side -----------------------------------------------------------------------------------


def state_node_to_dict(node: engine_pb2.StateNode) -> dict[str, Any]:
    """One node of the state tree in bamboo's get_status shape; children keyed by id."""
    return {
        "id": node.id,
        "type": node.type,
        "name": node.name,
        "state": node.state or None,
        "version": node.version,
        "loop": node.loop,
        "inner_loop": node.inner_loop,
        "retry": node.retry,
        "skip": node.skip,
        "error_ignored": node.error_ignored,
        "schedule_times": node.schedule_times,
        "start_time": _datetime(node.started_unix_ms),
        "finish_time": _datetime(node.finished_unix_ms),
        "elapsed_time": _elapsed(node.started_unix_ms, node.finished_unix_ms),
        "children": {child.id: state_node_to_dict(child) for child in node.children},
    }


def _history_to_dict(history: engine_pb2.NodeHistory) -> dict[str, Any]:
    return {
        "version": history.version,
        "state": _node_state_name(history.state),
        "loop": history.loop,
        "inner_loop": history.inner_loop,
        "retry": history.retry,
        "skip": history.skip,
        "error_ignored": history.error_ignored,
        "start_time": _datetime(history.started_unix_ms),
        "finish_time": _datetime(history.finished_unix_ms),
        "elapsed_time": _elapsed(history.started_unix_ms, history.finished_unix_ms),
        "inputs": _decode_json_object_or_text(history.inputs_json),
        "outputs": _decode_json_object_or_text(history.outputs_json),
    }


def _summary_to_dict(summary: engine_pb2.PipelineSummary) -> dict[str, Any]:
    return {
        "id": summary.pipeline_id,
        "state": _pipeline_state_name(summary.state),
        "name": summary.name,
        "create_time": _datetime(summary.created_unix_ms),
        "finish_time": _datetime(summary.finished_unix_ms),
    }


def _state_change_to_dict(change: engine_pb2.StateChange) -> dict[str, Any]:
    return {
        "pipeline_id": change.pipeline_id,
        "node_id": change.node_id or None,
        "old_state": change.old_state or None,
        "new_state": change.new_state or None,
        "version": change.version,
        "time": _datetime(change.at_unix_ms),
    }


def _problem_to_dict(problem: engine_pb2.ValidationProblem) -> dict[str, Any]:
    return {
        "code": problem.code,
        "message": problem.message,
        "node_id": problem.node_id or None,
        "flow_id": problem.flow_id or None,
    }


class EngineTransport(_Caller):
    """One method per EngineService RPC, taking and returning plain Python values."""

    def __init__(self, channel: grpc.Channel, metadata: Metadata = ()) -> None:
        super().__init__(metadata)
        self._stub = engine_pb2_grpc.EngineServiceStub(channel)

    def start_pipeline(
        self,
        *,
        tree_json: str,
        inputs_json: str,
        pipeline_id: str,
        idempotency_key: str,
        start_node_id: str,
        cycle_tolerate: bool,
        template_id: str,
        timeout_ms: int,
        failure_handler: str,
        timeout: float | None,
    ) -> tuple[str, bool]:
        request = engine_pb2.StartPipelineRequest(
            tree_json=tree_json,
            inputs_json=inputs_json,
            pipeline_id=pipeline_id,
            idempotency_key=idempotency_key,
            start_node_id=start_node_id,
            cycle_tolerate=cycle_tolerate,
            template_id=template_id,
            timeout_ms=timeout_ms,
            failure_handler=failure_handler,
        )
        response: engine_pb2.StartPipelineResponse = self._unary(self._stub.StartPipeline, request, timeout)
        return response.pipeline_id, response.created

    def start_pipelines(
        self, requests: Sequence[engine_pb2.StartPipelineRequest], timeout: float | None
    ) -> list[engine_pb2.StartPipelineResult]:
        request = engine_pb2.StartPipelinesRequest(pipelines=requests)
        response: engine_pb2.StartPipelinesResponse = self._unary(self._stub.StartPipelines, request, timeout)
        return list(response.results)

    def validate_pipeline(
        self, *, tree_json: str, inputs_json: str, cycle_tolerate: bool, timeout: float | None
    ) -> list[dict[str, Any]]:
        request = engine_pb2.ValidatePipelineRequest(
            tree_json=tree_json, inputs_json=inputs_json, cycle_tolerate=cycle_tolerate
        )
        response: engine_pb2.ValidatePipelineResponse = self._unary(self._stub.ValidatePipeline, request, timeout)
        return [_problem_to_dict(problem) for problem in response.problems]

    def pipeline_operation(self, operation: str, pipeline_id: str, subprocess_id: str, timeout: float | None) -> bool:
        """`operation` is PausePipeline, ResumePipeline or RevokePipeline."""
        request = engine_pb2.PipelineTarget(pipeline_id=pipeline_id, subprocess_id=subprocess_id)
        return self._operation(operation, request, timeout)

    def node_operation(self, operation: str, pipeline_id: str, node_id: str, timeout: float | None) -> bool:
        """`operation` is PauseNode, ResumeNode, RetrySubprocess or SkipNode."""
        request = engine_pb2.NodeTarget(pipeline_id=pipeline_id, node_id=node_id)
        return self._operation(operation, request, timeout)

    def retry_node(self, pipeline_id: str, node_id: str, inputs_json: str, timeout: float | None) -> bool:
        request = engine_pb2.RetryNodeRequest(pipeline_id=pipeline_id, node_id=node_id, inputs_json=inputs_json)
        return self._operation("RetryNode", request, timeout)

    def skip_exclusive_gateway(self, pipeline_id: str, node_id: str, flow_id: str, timeout: float | None) -> bool:
        request = engine_pb2.SkipExclusiveGatewayRequest(pipeline_id=pipeline_id, node_id=node_id, flow_id=flow_id)
        return self._operation("SkipExclusiveGateway", request, timeout)

    def skip_conditional_parallel_gateway(
        self, pipeline_id: str, node_id: str, flow_ids: Iterable[str], timeout: float | None
    ) -> bool:
        request = engine_pb2.SkipConditionalParallelGatewayRequest(
            pipeline_id=pipeline_id, node_id=node_id, flow_ids=list(flow_ids)
        )
        return self._operation("SkipConditionalParallelGateway", request, timeout)

    def force_fail_node(self, pipeline_id: str, node_id: str, message: str, timeout: float | None) -> bool:
        request = engine_pb2.ForceFailNodeRequest(pipeline_id=pipeline_id, node_id=node_id, message=message)
        return self._operation("ForceFailNode", request, timeout)

    def callback(self, pipeline_id: str, node_id: str, version: str, data_json: str, timeout: float | None) -> bool:
        request = engine_pb2.CallbackRequest(
            pipeline_id=pipeline_id, node_id=node_id, version=version, data_json=data_json
        )
        return self._operation("Callback", request, timeout)

    def _operation(self, rpc_name: str, request: Any, timeout: float | None) -> bool:
        response: engine_pb2.OperationResponse = self._unary(getattr(self._stub, rpc_name), request, timeout)
        return response.changed

    def get_state(self, pipeline_id: str, timeout: float | None) -> dict[str, Any]:
        request = engine_pb2.GetStateRequest(pipeline_id=pipeline_id)
        response: engine_pb2.GetStateResponse = self._unary(self._stub.GetState, request, timeout)
        state = state_node_to_dict(response.root)
        state["id"] = state["id"] or pipeline_id
        state["type"] = state["type"] or "Pipeline"
        # The root's state text is the pipeline's; the enum is the fallback if a server leaves it out.
        state["state"] = state["state"] or _pipeline_state_name(response.pipeline_state)
        # The pipeline's data.outputs, once it finished.
        state["outputs"] = json.loads(response.outputs_json) if response.outputs_json else {}
        # {"code", "state", "outputs"} of the pipeline's failure handler, None without one.
        state["failure_handler"] = json.loads(response.failure_handler_json) if response.failure_handler_json else None
        return state

    def get_node_data(self, pipeline_id: str, node_id: str, timeout: float | None) -> dict[str, Any]:
        request = engine_pb2.NodeTarget(pipeline_id=pipeline_id, node_id=node_id)
        response: engine_pb2.NodeData = self._unary(self._stub.GetNodeData, request, timeout)
        return {
            "inputs": _decode_json_object_or_text(response.inputs_json),
            "outputs": _decode_json_object_or_text(response.outputs_json),
            "ex_data": response.ex_data or None,
            "state": _node_state_name(response.state),
            "version": response.version,
        }

    def get_node_histories(self, pipeline_id: str, node_id: str, timeout: float | None) -> list[dict[str, Any]]:
        request = engine_pb2.NodeTarget(pipeline_id=pipeline_id, node_id=node_id)
        response: engine_pb2.GetNodeHistoriesResponse = self._unary(self._stub.GetNodeHistories, request, timeout)
        return [_history_to_dict(history) for history in response.histories]

    def list_pipelines_page(
        self, *, states: Sequence[str], page_size: int, page_token: str, timeout: float | None
    ) -> tuple[list[dict[str, Any]], str]:
        request = engine_pb2.ListPipelinesRequest(
            states=[pipeline_state_value(state) for state in states],
            page_size=page_size,
            page_token=page_token,
        )
        response: engine_pb2.ListPipelinesResponse = self._unary(self._stub.ListPipelines, request, timeout)
        return [_summary_to_dict(summary) for summary in response.pipelines], response.next_page_token

    def purge_pipelines(self, *, finished_before_unix_ms: int, timeout: float | None) -> int:
        request = engine_pb2.PurgePipelinesRequest(finished_before_unix_ms=finished_before_unix_ms)
        response: engine_pb2.PurgePipelinesResponse = self._unary(self._stub.PurgePipelines, request, timeout)
        return int(response.purged)

    def watch(
        self, pipeline_id: str, timeout: float | None, *, pipeline_only: bool = False
    ) -> Iterator[dict[str, Any]]:
        call = self._stub.Watch(
            engine_pb2.WatchRequest(pipeline_id=pipeline_id, pipeline_only=pipeline_only),
            timeout=timeout,
            metadata=self._metadata,
        )
        try:
            for change in call:
                yield _state_change_to_dict(change)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            # Ends the stream on the server when the caller stops iterating early.
            call.cancel()
