"""`EngineClient`: start pipelines, control them and read their state.

    with EngineClient("localhost:50051") as client:
        pipeline_id = client.start(build_tree(start), {"${name}": "world"})
        state = client.wait(pipeline_id)
        assert state["state"] == "FINISHED"

Methods take and return plain Python data. Errors raise the typed exceptions of `worker_sdk.errors`
with the server's message unchanged; operations return whether they changed anything.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from engine_api.engine.v1 import engine_pb2
from worker_sdk._transport import ChannelOptions, EngineTransport, Metadata, encode_json, open_channel
from worker_sdk.errors import DeadlineExceeded, EngineError, error_for_code, is_transient

__all__ = ["FINAL_STATES", "EngineClient", "PipelineStart", "StartResult", "WaitTimeout"]

# What one StartPipelines call may carry (the server refuses more); start_many() splits longer lists.
STARTS_PER_CALL = 1000
# Bytes of trees and inputs per StartPipelines call. A server accepts messages of its --max-tree-bytes (or
# --max-payload-bytes) plus 1 MiB, so calls of 1 MiB fit any server; a larger tree goes alone, as with start().
START_CALL_BYTES = 1024 * 1024


def start_calls(
    requests: Sequence[engine_pb2.StartPipelineRequest],
) -> list[Sequence[engine_pb2.StartPipelineRequest]]:
    """Splits start requests into StartPipelines calls that every server accepts, in order."""
    calls: list[Sequence[engine_pb2.StartPipelineRequest]] = []
    begin, size = 0, 0
    for end, request in enumerate(requests):
        request_size = request.ByteSize() + 8  # field tag and length
        if end > begin and (end - begin == STARTS_PER_CALL or size + request_size > START_CALL_BYTES):
            calls.append(requests[begin:end])
            begin, size = end, 0
        size += request_size
    if begin < len(requests):
        calls.append(requests[begin:])
    return calls


FINAL_STATES: tuple[str, ...] = ("FINISHED", "FAILED", "REVOKED")
"""Pipeline states `EngineClient.wait` stops at by default (FAILED can still be retried)."""


class WaitTimeout(TimeoutError):
    """`EngineClient.wait` ran out of time; `state` is the last state tree seen (None if none was)."""

    def __init__(self, message: str, state: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.state = state


def _tree_json(tree: Mapping[str, Any] | str) -> str:
    return tree if isinstance(tree, str) else encode_json(dict(tree))


@dataclass(frozen=True)
class PipelineStart:
    """One pipeline for `EngineClient.start_many`: the arguments `EngineClient.start` takes, all but `template_id`."""

    tree: Mapping[str, Any] | str
    inputs: Mapping[str, Any] | None = None
    pipeline_id: str | None = None
    idempotency_key: str | None = None
    start_node_id: str | None = None
    cycle_tolerate: bool = False
    timeout_ms: int = 0
    failure_handler: str | None = None

    def request(self) -> engine_pb2.StartPipelineRequest:
        return engine_pb2.StartPipelineRequest(
            tree_json=_tree_json(self.tree),
            inputs_json=encode_json(dict(self.inputs or {})),
            pipeline_id=self.pipeline_id or "",
            idempotency_key=self.idempotency_key or "",
            start_node_id=self.start_node_id or "",
            cycle_tolerate=self.cycle_tolerate,
            timeout_ms=self.timeout_ms,
            failure_handler=self.failure_handler or "",
        )


@dataclass(frozen=True)
class StartResult:
    """How one pipeline of `EngineClient.start_many` went: started (`pipeline_id`, and `created` False when
    its idempotency key matched an earlier pipeline), or refused with `error` (what `start` would raise)."""

    pipeline_id: str
    created: bool
    error: EngineError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class EngineClient:
    """A connection to the engine's EngineService.

    Args:
        target: the engine's address, ``"host:port"``.
        metadata: sent with every call, e.g. ``[("authorization", "Bearer <token>")]``.
        timeout: deadline in seconds of each call (None: no deadline).
        credentials: TLS channel credentials; plaintext when None.
        channel_options: extra gRPC channel options.
    """

    def __init__(
        self,
        target: str,
        *,
        metadata: Metadata | None = None,
        timeout: float | None = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: ChannelOptions = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(target, credentials=credentials, options=channel_options)
        self._engine = EngineTransport(self._channel, metadata or ())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- pipelines ---------------------------------------------------------------------------------

    def start(
        self,
        tree: Mapping[str, Any] | str | None,
        inputs: Mapping[str, Any] | None = None,
        *,
        pipeline_id: str | None = None,
        idempotency_key: str | None = None,
        start_node_id: str | None = None,
        cycle_tolerate: bool = False,
        template_id: str | None = None,
        timeout_ms: int = 0,
        failure_handler: str | None = None,
    ) -> str:
        """Validates and starts a pipeline; returns its id.

        `tree` is a bamboo pipeline tree (a dict such as `build_tree` returns, or JSON text); it may
        be None when `template_id` names a registered template. `inputs` fill the tree's
        ``data.inputs``, keyed like the tree (``"${name}"`` or ``"name"``). A second start with the
        same `idempotency_key` returns the first pipeline's id. With `timeout_ms`, the engine revokes
        the pipeline if it has not ended that long after it started. `failure_handler` names a
        component run once, as a task, the first time the pipeline fails (see ``get_state()["failure_handler"]``).
        """
        if tree is None and not template_id:
            raise ValueError("start() needs a tree or a template_id")
        started_id, _created = self._engine.start_pipeline(
            tree_json=_tree_json(tree) if tree is not None else "",
            inputs_json=encode_json(dict(inputs or {})),
            pipeline_id=pipeline_id or "",
            idempotency_key=idempotency_key or "",
            start_node_id=start_node_id or "",
            cycle_tolerate=cycle_tolerate,
            template_id=template_id or "",
            timeout_ms=timeout_ms,
            failure_handler=failure_handler or "",
            timeout=self.timeout,
        )
        return started_id

    def start_many(self, pipelines: Iterable[PipelineStart | Mapping[str, Any] | str]) -> list[StartResult]:
        """Starts many pipelines in StartPipelines calls of up to 1000 (and 1 MiB): far cheaper than a `start` each.

        Each item is a `PipelineStart`, or just a tree (dict or JSON text). One result per item, in order: an
        item the engine refuses (a wrong tree, a taken pipeline id) has its `error` set, and the others still
        start. When a call fails as a whole (the engine unreachable, its deadline), each of its items gets that
        error: some of them may have started even so, so give items an `idempotency_key` to send them again safely.
        """
        requests = [
            (item if isinstance(item, PipelineStart) else PipelineStart(tree=item)).request() for item in pipelines
        ]
        results: list[StartResult] = []
        for call in start_calls(requests):
            try:
                answers = self._engine.start_pipelines(call, self.timeout)
            except EngineError as exc:
                results.extend(StartResult("", False, exc) for _ in call)
                continue
            for answer in answers:
                if answer.WhichOneof("result") == "error":
                    results.append(StartResult("", False, error_for_code(answer.error.code, answer.error.message)))
                else:
                    results.append(StartResult(answer.started.pipeline_id, answer.started.created))
        return results

    def validate(
        self,
        tree: Mapping[str, Any] | str,
        inputs: Mapping[str, Any] | None = None,
        *,
        cycle_tolerate: bool = False,
    ) -> list[dict[str, Any]]:
        """The tree's problems (``{"code", "message", "node_id", "flow_id"}``); empty if it is valid.

        `inputs` are the presets a Start would pass: variables they define count as defined.
        """
        return self._engine.validate_pipeline(
            tree_json=_tree_json(tree),
            inputs_json=encode_json(dict(inputs or {})),
            cycle_tolerate=cycle_tolerate,
            timeout=self.timeout,
        )

    def get_state(self, pipeline_id: str) -> dict[str, Any]:
        """The state tree, in bamboo's get_status shape.

        The root is the pipeline: ``{"id", "type", "name", "state", "version", "loop", "inner_loop",
        "retry", "skip", "error_ignored", "schedule_times", "start_time", "finish_time",
        "elapsed_time", "children"}``; `children` maps node ids to nodes of the same shape
        (subprocesses nest). Times are UTC datetimes or None; `elapsed_time` is in seconds.
        """
        return self._engine.get_state(pipeline_id, self.timeout)

    def wait(
        self,
        pipeline_id: str,
        *,
        timeout: float = 60.0,
        poll_interval: float = 0.05,
        states: Iterable[str] = FINAL_STATES,
    ) -> dict[str, Any]:
        """Waits until the pipeline is in one of `states`; returns that state tree.

        Follows the pipeline's own state on a Watch stream (no polling of the whole tree); after a
        broken stream it looks again every `poll_interval`. Transient errors are retried until
        `timeout`; then `WaitTimeout` (a TimeoutError) is raised carrying the last state seen.
        """
        wanted = {state.upper() for state in states}
        deadline = time.monotonic() + timeout
        last_state: dict[str, Any] | None = None
        while True:
            try:
                last_state = self.get_state(pipeline_id)
                if last_state["state"] in wanted:
                    return last_state
                remaining = deadline - time.monotonic()
                if remaining > 0 and self._watch_for(pipeline_id, wanted, remaining):
                    continue  # reached: read the tree once more
            except EngineError as error:
                if not is_transient(error):
                    raise
            if time.monotonic() + poll_interval > deadline:
                seen = last_state["state"] if last_state is not None else "unknown"
                raise WaitTimeout(
                    f"pipeline {pipeline_id} is still {seen} after {timeout:g} s "
                    f"(waiting for {', '.join(sorted(wanted))})",
                    last_state,
                )
            time.sleep(poll_interval)

    def _watch_for(self, pipeline_id: str, wanted: set[str], timeout: float) -> bool:
        """True once the pipeline's state is one of `wanted`; False when the stream ended without it."""
        try:
            for change in self._engine.watch(pipeline_id, timeout, pipeline_only=True):
                if change["node_id"] is None and change["new_state"] in wanted:
                    return True
        except DeadlineExceeded:
            pass
        return False

    def purge_pipelines(self, older_than_seconds: float) -> int:
        """Retention: deletes FINISHED and REVOKED pipelines that ended more than this long ago; returns how many."""
        finished_before = int((time.time() - older_than_seconds) * 1000)
        return self._engine.purge_pipelines(finished_before_unix_ms=finished_before, timeout=self.timeout)

    def list_pipelines(self, states: Iterable[str] | None = None, page_size: int = 100) -> list[dict[str, Any]]:
        """All pipelines (in `states`, e.g. ``["RUNNING"]``, if given), following page tokens.

        Each is ``{"id", "state", "name", "create_time", "finish_time"}``.
        """
        wanted = list(states or ())
        pipelines: list[dict[str, Any]] = []
        page_token = ""
        while True:
            page, page_token = self._engine.list_pipelines_page(
                states=wanted, page_size=page_size, page_token=page_token, timeout=self.timeout
            )
            pipelines.extend(page)
            if not page_token:
                return pipelines

    def watch(self, pipeline_id: str) -> Iterator[dict[str, Any]]:
        """State changes as they happen, starting with the current state, until a final state.

        Each is ``{"pipeline_id", "node_id" (None for the pipeline itself), "old_state",
        "new_state", "version", "time"}``. Stop iterating (or close the iterator) to end the stream.
        """
        return self._engine.watch(pipeline_id, None)

    # --- nodes -------------------------------------------------------------------------------------

    def get_node_data(self, pipeline_id: str, node_id: str) -> dict[str, Any]:
        """``{"inputs", "outputs", "ex_data", "state", "version"}`` of the node's current attempt."""
        return self._engine.get_node_data(pipeline_id, node_id, self.timeout)

    def get_node_histories(self, pipeline_id: str, node_id: str) -> list[dict[str, Any]]:
        """Earlier attempts of the node (retries, loops), oldest first."""
        return self._engine.get_node_histories(pipeline_id, node_id, self.timeout)

    # --- control -----------------------------------------------------------------------------------

    def pause_pipeline(self, pipeline_id: str, subprocess_id: str | None = None) -> bool:
        return self._engine.pipeline_operation("PausePipeline", pipeline_id, subprocess_id or "", self.timeout)

    def resume_pipeline(self, pipeline_id: str, subprocess_id: str | None = None) -> bool:
        return self._engine.pipeline_operation("ResumePipeline", pipeline_id, subprocess_id or "", self.timeout)

    def revoke_pipeline(self, pipeline_id: str, subprocess_id: str | None = None) -> bool:
        return self._engine.pipeline_operation("RevokePipeline", pipeline_id, subprocess_id or "", self.timeout)

    def pause_node(self, pipeline_id: str, node_id: str) -> bool:
        return self._engine.node_operation("PauseNode", pipeline_id, node_id, self.timeout)

    def resume_node(self, pipeline_id: str, node_id: str) -> bool:
        return self._engine.node_operation("ResumeNode", pipeline_id, node_id, self.timeout)

    def retry_node(self, pipeline_id: str, node_id: str, inputs: Mapping[str, Any] | None = None) -> bool:
        """Runs a FAILED node again; `inputs`, if given, replace its inputs for the new attempt."""
        inputs_json = encode_json(dict(inputs)) if inputs is not None else ""
        return self._engine.retry_node(pipeline_id, node_id, inputs_json, self.timeout)

    def retry_subprocess(self, pipeline_id: str, node_id: str) -> bool:
        return self._engine.node_operation("RetrySubprocess", pipeline_id, node_id, self.timeout)

    def skip_node(self, pipeline_id: str, node_id: str) -> bool:
        return self._engine.node_operation("SkipNode", pipeline_id, node_id, self.timeout)

    def skip_exclusive_gateway(self, pipeline_id: str, node_id: str, flow_id: str) -> bool:
        return self._engine.skip_exclusive_gateway(pipeline_id, node_id, flow_id, self.timeout)

    def skip_conditional_parallel_gateway(self, pipeline_id: str, node_id: str, flow_ids: Sequence[str]) -> bool:
        return self._engine.skip_conditional_parallel_gateway(pipeline_id, node_id, flow_ids, self.timeout)

    def force_fail(self, pipeline_id: str, node_id: str, message: str = "") -> bool:
        """Fails a RUNNING activity now (ex_data = `message`); its worker is told to cancel."""
        return self._engine.force_fail_node(pipeline_id, node_id, message, self.timeout)

    def callback(self, pipeline_id: str, node_id: str, version: str, data: Any) -> bool:
        """Delivers `data` (any JSON value) to a node awaiting a callback at `version`."""
        return self._engine.callback(pipeline_id, node_id, version, encode_json(data), self.timeout)
