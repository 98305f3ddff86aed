"""The streaming transport: one `TaskStream` call carries tasks to the worker and its reports back.

A long poll costs a unary call per batch of tasks, and every report another. On one stream the same
work is a few messages, which is what lets a Python worker keep up with thousands of tasks a second.
The worker grants the server one credit per free slot; the server never sends more tasks than that.

The stream lives on an event loop of its own (grpc.aio) that runs no component code: tasks are read,
replies routed and reports written there without a thread per step, and a component's thread hands
its outcome over instead of blocking on the engine's reply. Thread hand-offs, not the network, were
what a task cost a threaded worker: the stream's own threads, a pool thread blocked on each reply,
and waking each of them.

Reports (complete, fail, heartbeat) are matched to their replies by a request id. When no stream is
open, or it broke, the same reports go out as unary calls: task tokens are valid for both, so a
result is never stuck behind a reconnecting stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
from collections.abc import Callable
from typing import Any

import grpc

from engine_api.engine.v1 import worker_pb2, worker_pb2_grpc
from worker_sdk._models import Task
from worker_sdk._threads import EventLoopThread
from worker_sdk._transport import Metadata, WorkerTransport, task_from_proto
from worker_sdk.errors import DeadlineExceeded, Unavailable, error_for_code, error_for_status, from_rpc_error

logger = logging.getLogger("worker_sdk")

# Reports are packed into one message up to this size; a single larger report goes alone (the server
# accepts messages up to its payload limit plus framing).
_MAX_PACKED_BYTES = 512 * 1024


class _StreamClosed(Unavailable):
    """The stream was already closed when a report was to be sent: send it as a unary call instead."""


class StreamSession:
    """One TaskStream call, run by `run()` on the worker's event loop.

    `grant` and `send_blocking` may be called from any thread; `send` and everything else only on the loop.
    Credit and reports are queued and written by one writer, which packs whatever is queued when it gets
    to write into one message, so a busy worker sends few messages.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        event_loop: EventLoopThread,
        *,
        metadata: Metadata,
        worker_id: str,
        component_codes: tuple[str, ...],
        credit: int,
    ) -> None:
        self._channel = channel
        self._event_loop = event_loop
        self._metadata = tuple(metadata)
        self._hello = worker_pb2.StreamHello(worker_id=worker_id, component_codes=component_codes)
        self._credit = max(credit, 0)
        self._reports: list[worker_pb2.StreamReport] = []
        self._replies: dict[int, asyncio.Future[worker_pb2.StreamReply]] = {}
        self._request_ids = itertools.count(1)
        self._queued = asyncio.Event()
        self._call: Any = None
        self._closed = False

    def on_loop(self) -> bool:
        """Whether the caller runs on the session's event loop."""
        return self._event_loop.is_current()

    # --- on the loop -------------------------------------------------------------------------------

    async def run(self, on_tasks: Callable[[list[Task]], None]) -> None:
        """Opens the stream and hands arriving tasks to `on_tasks` until it ends: returns when the server
        ends it cleanly, raises EngineError when it fails (CANCELLED after `interrupt`)."""
        if self._closed:
            return  # interrupted before it opened
        stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self._call = stub.TaskStream(metadata=self._metadata)
        writer = asyncio.create_task(self._write_queued())
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    return
                for reply in response.replies:
                    self._route(reply)
                if response.tasks:
                    on_tasks([task_from_proto(task) for task in response.tasks])
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        except asyncio.CancelledError:
            if not self._closed:
                raise  # this coroutine itself was cancelled: the loop is closing
            # grpc.aio raises CancelledError from a call cancelled locally (by `interrupt`).
            raise error_for_status(grpc.StatusCode.CANCELLED, "the task stream was closed by the worker") from None
        finally:
            self._close()
            writer.cancel()

    async def send(self, timeout: float, **report: Any) -> worker_pb2.StreamReply:
        """Sends one report (`complete=`, `fail=` or `heartbeat=`) and waits for its reply.

        Raises Unavailable when the stream is (or becomes) closed: the caller sends it another way.
        """
        if self._closed:
            raise _StreamClosed("the task stream is closed")
        request_id = next(self._request_ids)
        reply: asyncio.Future[worker_pb2.StreamReply] = self._event_loop.loop.create_future()
        self._replies[request_id] = reply
        self._reports.append(worker_pb2.StreamReport(request_id=request_id, **report))
        self._queued.set()
        try:
            async with asyncio.timeout(timeout):
                return await reply
        except TimeoutError:
            raise DeadlineExceeded(f"no reply on the task stream within {timeout:.1f} s") from None
        finally:
            self._replies.pop(request_id, None)

    def add_credit(self, credit: int) -> None:
        if not self._closed:
            self._credit += credit
            self._queued.set()

    async def _write_queued(self) -> None:
        first = True
        try:
            while True:
                if not first:
                    await self._queued.wait()
                self._queued.clear()
                while first or self._credit or self._reports:
                    message = self._next_message(hello=first)
                    first = False
                    await self._call.write(message)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the call ended, or cannot carry this: end it, the reader reconnects
            logger.debug("writing to the task stream failed: %s", error)
            self._close()

    def _next_message(self, *, hello: bool) -> worker_pb2.TaskStreamRequest:
        message = worker_pb2.TaskStreamRequest(credit=self._credit)
        if hello:
            message.hello.CopyFrom(self._hello)
        self._credit = 0
        size = 0
        taken = 0
        for report in self._reports:
            size += report.ByteSize()
            if taken and size > _MAX_PACKED_BYTES:
                break  # the rest starts the next message
            taken += 1
        message.reports.extend(self._reports[:taken])
        del self._reports[:taken]
        return message

    def _route(self, reply: worker_pb2.StreamReply) -> None:
        waiting = self._replies.get(reply.request_id)
        if waiting is None or waiting.done():
            return  # its sender gave up (timed out) and will retry
        if reply.WhichOneof("result") == "error":
            waiting.set_exception(error_for_code(reply.error.code, reply.error.message))
        else:
            waiting.set_result(reply)

    def _close(self) -> None:
        """Reports waiting for a reply fail with Unavailable (their senders retry as unary calls)."""
        if self._closed:
            return
        self._closed = True
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(Unavailable("the task stream ended before the engine replied"))
        self._replies.clear()
        self._reports.clear()
        if self._call is not None:
            self._call.cancel()

    # --- from any thread ---------------------------------------------------------------------------

    def grant(self, credit: int) -> None:
        """Tells the server the worker can take `credit` more tasks."""
        if self.on_loop():
            self.add_credit(credit)
        else:
            self._event_loop.call_soon(self.add_credit, credit)

    def send_blocking(self, timeout: float, **report: Any) -> worker_pb2.StreamReply:
        """`send` for a thread other than the loop's (heartbeats)."""
        future = self._event_loop.submit(self.send(timeout, **report))
        try:
            return future.result(timeout + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded(f"no reply on the task stream within {timeout:.1f} s") from None

    def interrupt(self) -> None:
        """Ends the stream; safe from a signal handler. `run()` then raises CANCELLED (or returns at once)."""
        self._event_loop.call_soon(self._close)  # a closed loop has closed the stream already


class StreamingTransport(WorkerTransport):
    """A WorkerTransport whose reports use the attached stream while there is one, unary calls otherwise."""

    def __init__(self, channel: grpc.Channel, metadata: Metadata = ()) -> None:
        super().__init__(channel, metadata)
        self._session: StreamSession | None = None

    def attach(self, session: StreamSession | None) -> None:
        self._session = session

    async def send_report_async(
        self, kind: str, request: Any, timeout: float, pool: concurrent.futures.Executor
    ) -> Any:
        session = self._session
        if session is not None and session.on_loop():
            try:
                reply = await session.send(timeout, **{kind: request})
                return getattr(reply, kind)
            except _StreamClosed:
                pass
        return await super().send_report_async(kind, request, timeout, pool)

    def send_report(self, kind: str, request: Any, timeout: float) -> Any:
        session = self._session
        if session is not None and not session.on_loop():
            try:
                return getattr(session.send_blocking(timeout, **{kind: request}), kind)
            except _StreamClosed:
                pass
        return super().send_report(kind, request, timeout)
