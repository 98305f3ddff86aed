"""The streaming transport: one `TaskStream` call carries tasks to the worker and its reports back.

A long poll costs a unary call per batch of tasks, and every report another. On one stream the same
work is a few messages, which is what lets a Python worker keep up with thousands of tasks a second.
The worker grants the server one credit per free slot; the server never sends more tasks than that.

Reports (complete, fail, heartbeat) are matched to their replies by a request id. When no stream is
open, or it broke, the same reports go out as unary calls: task tokens are valid for both, so a
result is never stuck behind a reconnecting stream.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from engine_api.engine.v1 import worker_pb2
from worker_sdk._models import Task
from worker_sdk._transport import WorkerTransport, task_from_proto
from worker_sdk.errors import DeadlineExceeded, Unavailable, error_for_code, from_rpc_error

# Reports are packed into one message up to this size; a single larger report goes alone (the server
# accepts messages up to its payload limit plus framing).
_MAX_PACKED_BYTES = 512 * 1024


class _StreamClosed(Unavailable):
    """The stream was already closed when a report was to be sent: send it as a unary call instead."""


class StreamSession:
    """One open TaskStream. `tasks()` reads it on the calling thread; other threads send on it.

    What other threads send is queued as credits and reports; gRPC's sending thread packs everything
    queued into one message, so a busy worker sends few messages.
    """

    def __init__(self, transport: WorkerTransport, *, worker_id: str, component_codes: tuple[str, ...], credit: int):
        self._outgoing: queue.SimpleQueue[int | worker_pb2.StreamReport | None] = queue.SimpleQueue()
        self._hello = worker_pb2.StreamHello(worker_id=worker_id, component_codes=component_codes)
        if credit > 0:
            self._outgoing.put(credit)
        # Reentrant: Worker.stop() may run in a signal handler on the thread that holds it.
        self._lock = threading.RLock()
        self._replies: dict[int, concurrent.futures.Future[worker_pb2.StreamReply]] = {}
        self._request_ids = itertools.count(1)
        self._closed = False
        self._call = transport.stub.TaskStream(self._requests(), metadata=transport.metadata)

    def _requests(self) -> Iterator[worker_pb2.TaskStreamRequest]:
        yield worker_pb2.TaskStreamRequest(hello=self._hello)
        carried: int | worker_pb2.StreamReport | None = None
        while True:
            item = carried if carried is not None else self._outgoing.get()
            carried = None
            message = worker_pb2.TaskStreamRequest()
            size = 0
            while True:
                if item is None:
                    if message.credit or message.reports:
                        yield message
                    return
                if isinstance(item, int):
                    message.credit += item
                else:
                    size += item.ByteSize()
                    if message.reports and size > _MAX_PACKED_BYTES:
                        carried = item  # starts the next message
                        break
                    message.reports.append(item)
                if self._outgoing.empty():
                    break
                item = self._outgoing.get_nowait()
            yield message

    def tasks(self) -> Iterator[Task]:
        """Yields tasks as they arrive and routes replies to their senders; raises EngineError when the
        stream ends with an error, returns when it ends cleanly."""
        try:
            for response in self._call:
                for reply in response.replies:
                    self._route(reply)
                for task in response.tasks:
                    yield task_from_proto(task)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            self.close()

    def grant(self, credit: int) -> None:
        """Tells the server the worker can take `credit` more tasks."""
        with self._lock:
            if not self._closed:
                self._outgoing.put(credit)

    def send(self, timeout: float, **report: Any) -> worker_pb2.StreamReply:
        """Sends one report (`complete=`, `fail=` or `heartbeat=`) and waits for its reply.

        Raises Unavailable when the stream is (or becomes) closed: the caller sends it another way.
        """
        with self._lock:
            if self._closed:
                raise _StreamClosed("the task stream is closed")
            request_id = next(self._request_ids)
            reply: concurrent.futures.Future[worker_pb2.StreamReply] = concurrent.futures.Future()
            self._replies[request_id] = reply
            self._outgoing.put(worker_pb2.StreamReport(request_id=request_id, **report))
        try:
            return reply.result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeadlineExceeded(f"no reply on the task stream within {timeout:.1f} s") from None
        finally:
            with self._lock:
                self._replies.pop(request_id, None)

    def interrupt(self) -> None:
        """Cancels the call without taking any lock (safe in a signal handler); `tasks()` then ends and
        closes the session on its own thread."""
        self._call.cancel()

    def close(self) -> None:
        """Ends the stream; reports waiting for a reply fail with Unavailable (their senders retry)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._replies.values())
            self._replies.clear()
            for reply in waiting:
                _settle(reply, error=Unavailable("the task stream ended before the engine replied"))
        self._outgoing.put(None)
        self._call.cancel()

    def _route(self, reply: worker_pb2.StreamReply) -> None:
        with self._lock:
            waiting = self._replies.get(reply.request_id)
            if waiting is None:
                return  # its sender gave up (timed out) and will retry
            if reply.WhichOneof("result") == "error":
                _settle(waiting, error=error_for_code(reply.error.code, reply.error.message))
            else:
                _settle(waiting, result=reply)


def _settle(
    future: concurrent.futures.Future[worker_pb2.StreamReply],
    *,
    result: worker_pb2.StreamReply | None = None,
    error: BaseException | None = None,
) -> None:
    """Resolves a reply once; a second resolution (close and a late reply racing) is ignored."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except concurrent.futures.InvalidStateError:
        pass


class StreamingTransport(WorkerTransport):
    """A WorkerTransport whose reports use the attached stream while there is one, unary calls otherwise."""

    def __init__(self, channel: grpc.Channel, metadata: Any = ()) -> None:
        super().__init__(channel, metadata)
        self._session: StreamSession | None = None

    def attach(self, session: StreamSession | None) -> None:
        self._session = session

    def _via_stream(self, timeout: float, **report: Any) -> worker_pb2.StreamReply | None:
        session = self._session
        if session is None:
            return None
        try:
            return session.send(timeout, **report)
        except _StreamClosed:
            return None

    def _send_heartbeat(self, request: worker_pb2.HeartbeatRequest, timeout: float) -> worker_pb2.HeartbeatResponse:
        reply = self._via_stream(timeout, heartbeat=request)
        return reply.heartbeat if reply is not None else super()._send_heartbeat(request, timeout)

    def _send_complete(
        self, request: worker_pb2.CompleteTaskRequest, timeout: float
    ) -> worker_pb2.CompleteTaskResponse:
        reply = self._via_stream(timeout, complete=request)
        return reply.complete if reply is not None else super()._send_complete(request, timeout)

    def _send_fail(self, request: worker_pb2.FailTaskRequest, timeout: float) -> worker_pb2.FailTaskResponse:
        reply = self._via_stream(timeout, fail=request)
        return reply.fail if reply is not None else super()._send_fail(request, timeout)
