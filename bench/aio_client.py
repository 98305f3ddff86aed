"""An asyncio client of the engine's public gRPC API, for scenarios that issue many calls at once.

The SDK's `EngineClient` is synchronous: one call in flight per thread. Starting 100 pipelines
"together", keeping hundreds in flight for a sustained load, or calling 10,000 nodes back needs many
calls in flight from one process without the client becoming the bottleneck, so this module talks
to the generated `engine_api` stubs over a `grpc.aio` channel, sending exactly what `EngineClient`
sends (tree JSON text, JSON data).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc

from engine_api.engine.v1 import engine_pb2, engine_pb2_grpc, types_pb2

T = TypeVar("T")
R = TypeVar("R")

# Deadline of one call: generous, as calls queue behind each other when thousands are in flight.
CALL_TIMEOUT_S = 120.0
UNSETTLED = (types_pb2.PIPELINE_STATE_RUNNING, types_pb2.PIPELINE_STATE_SUSPENDED)
SETTLED = (types_pb2.PIPELINE_STATE_FINISHED, types_pb2.PIPELINE_STATE_FAILED, types_pb2.PIPELINE_STATE_REVOKED)


@dataclass(frozen=True)
class PipelineSummary:
    id: str
    state: str  # "FINISHED", "FAILED", ...
    created_ms: int
    """Engine clock, Unix milliseconds."""
    finished_ms: int
    """Engine clock, Unix milliseconds; 0 while unfinished."""


@dataclass(frozen=True)
class NodeData:
    state: str  # "RUNNING", "FINISHED", ...
    version: str
    outputs: dict[str, Any]


def _pipeline_state_name(number: types_pb2.PipelineState.ValueType) -> str:
    return types_pb2.PipelineState.Name(number).removeprefix("PIPELINE_STATE_")


def _node_state_name(number: types_pb2.NodeState.ValueType) -> str:
    return types_pb2.NodeState.Name(number).removeprefix("NODE_STATE_")


class AsyncEngineClient:
    """One `grpc.aio` channel to the engine's EngineService. Use as ``async with``."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = engine_pb2_grpc.EngineServiceStub(self._channel)

    async def __aenter__(self) -> AsyncEngineClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._channel.close()

    async def start(self, tree_json: str) -> str:
        request = engine_pb2.StartPipelineRequest(tree_json=tree_json, inputs_json="{}")
        response = await self._stub.StartPipeline(request, timeout=CALL_TIMEOUT_S)
        return str(response.pipeline_id)

    async def start_many(self, starts: Sequence[engine_pb2.StartPipelineRequest]) -> list[str]:
        """One StartPipelines call (see worker_sdk.client.start_calls); raises if the engine refused any."""
        request = engine_pb2.StartPipelinesRequest(pipelines=starts)
        response = await self._stub.StartPipelines(request, timeout=CALL_TIMEOUT_S)
        refused = [result.error.message for result in response.results if result.WhichOneof("result") == "error"]
        if refused:
            raise RuntimeError(f"the engine refused {len(refused)} of {len(starts)} starts, e.g.: {refused[0]}")
        return [result.started.pipeline_id for result in response.results]

    async def callback(self, pipeline_id: str, node_id: str, version: str, data: Any) -> bool:
        request = engine_pb2.CallbackRequest(
            pipeline_id=pipeline_id, node_id=node_id, version=version, data_json=json.dumps(data)
        )
        response = await self._stub.Callback(request, timeout=CALL_TIMEOUT_S)
        return bool(response.changed)

    async def node_data(self, pipeline_id: str, node_id: str) -> NodeData:
        request = engine_pb2.NodeTarget(pipeline_id=pipeline_id, node_id=node_id)
        response = await self._stub.GetNodeData(request, timeout=CALL_TIMEOUT_S)
        outputs = json.loads(response.outputs_json) if response.outputs_json else {}
        if not isinstance(outputs, dict):
            outputs = {}
        return NodeData(_node_state_name(response.state), response.version, outputs)

    async def list_pipelines(self, states: Sequence[types_pb2.PipelineState.ValueType]) -> list[PipelineSummary]:
        """Every pipeline in `states`, following the pages."""
        found: list[PipelineSummary] = []
        page_token = ""
        while True:
            request = engine_pb2.ListPipelinesRequest(states=list(states), page_size=1000, page_token=page_token)
            response = await self._stub.ListPipelines(request, timeout=CALL_TIMEOUT_S)
            found.extend(
                PipelineSummary(p.pipeline_id, _pipeline_state_name(p.state), p.created_unix_ms, p.finished_unix_ms)
                for p in response.pipelines
            )
            page_token = response.next_page_token
            if not page_token:
                return found

    async def unsettled_ids(self) -> set[str]:
        """Ids of the pipelines that may still change by themselves (RUNNING or SUSPENDED)."""
        return {summary.id for summary in await self.list_pipelines(UNSETTLED)}

    async def settled(self, pipeline_ids: Collection[str]) -> dict[str, PipelineSummary]:
        """The settled pipelines among `pipeline_ids`, by id."""
        wanted = set(pipeline_ids)
        return {summary.id: summary for summary in await self.list_pipelines(SETTLED) if summary.id in wanted}


class StartBatcher:
    """Starts asked for within `linger_s` of each other go out as one StartPipelines call.

    This is how a client that starts pipelines at a high rate sends them (as `EngineClient.start_many`
    does): one call per batch instead of one per pipeline, the unary call's cost in gRPC being most of
    what a one-node pipeline costs the engine. With `linger_s` 0, the batch is what was asked for in the
    same turn of the event loop; a caller timing a start from its request includes the linger.
    """

    def __init__(self, client: AsyncEngineClient, *, linger_s: float = 0.0, max_items: int = 1000) -> None:
        self._client = client
        self._linger_s = linger_s
        self._max_items = max_items
        self._queued: list[tuple[str, asyncio.Future[str]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self, tree_json: str) -> str:
        loop = asyncio.get_running_loop()
        started: asyncio.Future[str] = loop.create_future()
        self._queued.append((tree_json, started))
        if len(self._queued) == 1:
            loop.call_later(self._linger_s, self._send_queued) if self._linger_s else loop.call_soon(self._send_queued)
        elif len(self._queued) >= self._max_items:
            self._send_queued()
        return await started

    def _send_queued(self) -> None:
        batch, self._queued = self._queued, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[str, asyncio.Future[str]]]) -> None:
        try:
            requests = [engine_pb2.StartPipelineRequest(tree_json=tree, inputs_json="{}") for tree, _ in batch]
            pipeline_ids = await self._client.start_many(requests)
        except Exception as error:
            for _, started in batch:
                if not started.done():
                    started.set_exception(error)
            return
        for (_, started), pipeline_id in zip(batch, pipeline_ids, strict=True):
            if not started.done():
                started.set_result(pipeline_id)


async def map_concurrently(function: Callable[[T], Awaitable[R]], items: Iterable[T], limit: int | None) -> list[R]:
    """`function` over `items`, all in flight at once, or at most `limit` at a time; results in order."""
    if limit is None:
        return list(await asyncio.gather(*(function(item) for item in items)))
    semaphore = asyncio.Semaphore(limit)

    async def bounded(item: T) -> R:
        async with semaphore:
            return await function(item)

    return list(await asyncio.gather(*(bounded(item) for item in items)))
