"""What the Python worker sends on a TaskStream, seen by a recording server.

A freed slot's credit must travel in the same message as the report that freed it: the engine then
commits the result and claims the next task in one batch. Sent apart, every task would cost the engine
two batches and the chain a second round trip.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from engine_api.engine.v1 import worker_pb2, worker_pb2_grpc
from worker_sdk import Worker, component

TASKS = 12


@component("sync_echo")
def sync_echo(i: int) -> dict[str, int]:
    return {"i": i}


@component("async_echo")
async def async_echo(i: int) -> dict[str, int]:
    return {"i": i}


class RecordingStream(worker_pb2_grpc.WorkerServiceServicer):
    """Hands out TASKS tasks one at a time, alternating the two components, and records every message."""

    def __init__(self) -> None:
        self.messages: list[worker_pb2.TaskStreamRequest] = []
        self.reported = threading.Event()

    def TaskStream(
        self, request_iterator: Iterator[worker_pb2.TaskStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.TaskStreamResponse]:
        self.messages.append(next(request_iterator))
        sent = 1
        yield worker_pb2.TaskStreamResponse(tasks=[self._task(sent)])
        reports = 0
        for request in request_iterator:
            self.messages.append(request)
            reports += len(request.reports)
            response = worker_pb2.TaskStreamResponse(
                replies=[
                    worker_pb2.StreamReply(request_id=report.request_id, complete=worker_pb2.CompleteTaskResponse())
                    for report in request.reports
                ]
            )
            if request.reports and sent < TASKS:
                sent += 1
                response.tasks.append(self._task(sent))
            yield response
            if reports >= TASKS:
                self.reported.set()

    @staticmethod
    def _task(number: int) -> worker_pb2.Task:
        return worker_pb2.Task(
            task_id=f"t{number}",
            token=f"token-{number}",
            pipeline_id="p",
            node_id=f"n{number}",
            node_version="v1",
            component_code="sync_echo" if number % 2 else "async_echo",
            inputs_json=f'{{"i": {number}}}',
            lease_deadline_unix_ms=0,
        )


@pytest.fixture
def recording_server() -> Iterator[tuple[str, RecordingStream]]:
    servicer = RecordingStream()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_each_report_carries_the_credit_of_the_slot_it_freed(recording_server: tuple[str, Any]) -> None:
    address, servicer = recording_server
    with Worker(address, [sync_echo, async_echo], concurrency=4, max_reconnect_backoff=0.5):
        assert servicer.reported.wait(20), f"only {len(servicer.messages)} messages arrived"

    hello, *after = servicer.messages
    assert list(hello.hello.component_codes) == ["async_echo", "sync_echo"]
    assert hello.credit == 4
    reports = [message for message in after if message.reports]
    # One message per task, each with the task's report and the credit of its slot.
    assert [(len(message.reports), message.credit) for message in reports[:TASKS]] == [(1, 1)] * TASKS
    assert [message.reports[0].complete.token for message in reports[:TASKS]] == [
        f"token-{n}" for n in range(1, TASKS + 1)
    ]
    assert [message.reports[0].complete.outputs_json for message in reports[:TASKS]] == [
        f'{{"i":{n}}}' for n in range(1, TASKS + 1)
    ]
    # Credit never travels alone while tasks are reported.
    assert not [message for message in after[: len(reports)] if not message.reports]


class RepliesToEverything(worker_pb2_grpc.WorkerServiceServicer):
    """Sends `tasks` at once, then answers every report with success; records each report's kind and token."""

    def __init__(self, tasks: list[worker_pb2.Task]) -> None:
        self.tasks = tasks
        self.reports: list[tuple[float, str, str]] = []

    def TaskStream(
        self, request_iterator: Iterator[worker_pb2.TaskStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.TaskStreamResponse]:
        next(request_iterator)
        yield worker_pb2.TaskStreamResponse(tasks=self.tasks)
        for request in request_iterator:
            replies = []
            for report in request.reports:
                kind = report.WhichOneof("report")
                self.reports.append((time.monotonic(), kind, getattr(report, kind).token))
                reply = worker_pb2.StreamReply(request_id=report.request_id)
                if kind == "heartbeat":
                    reply.heartbeat.lease_deadline_unix_ms = int((time.time() + 30) * 1000)
                elif kind == "complete":
                    reply.complete.SetInParent()
                else:
                    reply.fail.SetInParent()
                replies.append(reply)
            if replies:
                yield worker_pb2.TaskStreamResponse(replies=replies)


BLOCKS_FOR_S = 10.0


@component("blocks_its_loop")
async def blocks_its_loop() -> dict[str, bool]:
    time.sleep(BLOCKS_FOR_S)  # the mistake: a blocking call inside `async def`
    return {"done": True}


@component("slow_sync")
def slow_sync() -> dict[str, bool]:
    time.sleep(2.5)
    return {"done": True}


def test_an_async_component_that_blocks_holds_up_neither_heartbeats_nor_other_results_nor_stop() -> None:
    def task(code: str) -> worker_pb2.Task:
        return worker_pb2.Task(task_id=code, token=f"token-{code}", pipeline_id="p", node_id=code, component_code=code)

    servicer = RepliesToEverything([task("blocks_its_loop"), task("slow_sync")])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    worker = Worker(
        f"127.0.0.1:{port}", [blocks_its_loop, slow_sync], concurrency=2, heartbeat_interval=0.5, shutdown_grace=0.5
    )
    try:
        began = time.monotonic()
        worker.start()
        time.sleep(2.8)
        worker.stop()
        # The grace (0.5 s), then at most 5 s for the blocked components' loop to end: the stream does not wait.
        assert worker.join(timeout=7.0), "the worker did not stop while an async component blocked its loop"
        stopped_after = time.monotonic() - began
    finally:
        server.stop(grace=None)

    sync_heartbeats = [
        at - began for at, kind, token in servicer.reports if (kind, token) == ("heartbeat", "token-slow_sync")
    ]
    assert len(sync_heartbeats) >= 3, servicer.reports
    assert ("complete", "token-slow_sync") in [(kind, token) for _, kind, token in servicer.reports]
    assert stopped_after < BLOCKS_FOR_S - 0.5  # before the blocking call ends
