"""Runs claimed tasks and reports their results.

A plain component runs on a thread of the worker's pool; an ``async def`` one runs on the worker's
component event loop. On a task stream, every report is sent from the stream's own loop (`report_loop`):
the component's thread or loop hands its outcome over and is free at once, instead of waiting for the
engine's reply. No user code runs on the stream's loop, so a component that blocks by mistake cannot
hold up heartbeats, other tasks' reports or shutdown. Either way a task holds one slot from claim to
report, so the worker never has more than `concurrency` tasks in flight.

Reports survive short outages: transient errors are retried with backoff for a bounded time. A
refused token (FAILED_PRECONDITION) means another attempt owns the node now, so the result is
dropped without retrying, as the protocol asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeVar

from worker_sdk._backoff import Backoff
from worker_sdk._heartbeat import HeartbeatManager
from worker_sdk._models import Task
from worker_sdk._threads import EventLoopThread
from worker_sdk._transport import WorkerTransport, complete_request, fail_request
from worker_sdk.component import (
    AwaitCallback,
    Component,
    Done,
    Failure,
    Outcome,
    PollAgain,
    format_exception,
    invoke,
    invoke_async,
)
from worker_sdk.context import TaskContext
from worker_sdk.errors import EngineError, FailedPrecondition, InvalidArgument, NotFound, is_transient

logger = logging.getLogger("worker_sdk")

T = TypeVar("T")

# Kept short so that a message refused as too large still reaches the engine in some form.
_TRUNCATED_MESSAGE_CHARS = 2000


@dataclass(eq=False)
class _Running:
    task: Task
    ctx: TaskContext
    component: Component | None
    cancel_coroutine: Callable[[], None] | None = None
    ran: bool = False  # the component has returned (or never ran); its result may still be reporting


@dataclass(frozen=True)
class _Send:
    """One report a report flow asks to have delivered."""

    what: str  # for logs: "completion" or "failure"
    kind: str  # the transport's report kind: "complete" or "fail"
    request: Any


# A report flow yields what to send and is sent back the reply (None: dropped); InvalidArgument is thrown in.
_ReportFlow = Generator[_Send, Any, None]


def _next_send(flow: _ReportFlow, reply: Any, refused: InvalidArgument | None) -> _Send | None:
    """Gives the flow the last send's reply (or the engine's refusal); returns what to send next, None when done."""
    try:
        return flow.throw(refused) if refused is not None else flow.send(reply)
    except StopIteration:
        return None


class TaskExecutor:
    def __init__(
        self,
        *,
        components: Mapping[tuple[str, str], Component],
        transport: WorkerTransport,
        heartbeats: HeartbeatManager,
        pool: concurrent.futures.Executor,
        event_loop: EventLoopThread | None,
        worker_id: str,
        rpc_timeout: float,
        report_timeout: float,
        on_finished: Callable[[], None],
        on_ran: Callable[[], None] | None = None,
        report_loop: EventLoopThread | None = None,
    ) -> None:
        self._components = components
        self._transport = transport
        self._heartbeats = heartbeats
        self._pool = pool
        self._event_loop = event_loop
        self._report_loop = report_loop
        # Outcomes handed to the report loop that it has not taken yet (see _hand_to_loop).
        self._handed: list[tuple[_Running, Outcome | None]] = []
        self._handed_lock = threading.Lock()
        self._worker_id = worker_id
        self._rpc_timeout = rpc_timeout
        self._report_timeout = report_timeout
        self._on_finished = on_finished
        self._on_ran = on_ran
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        # Set when the shutdown grace is over: reports stop retrying and results are dropped.
        self._abandoned = threading.Event()

    # --- dispatch ----------------------------------------------------------------------------------

    def submit(self, task: Task) -> None:
        """Starts running a claimed task; `on_ran` is called once its component has returned, and
        `on_finished` once its result is reported or dropped."""
        component = self._components.get((task.component_code, task.component_version))
        running = _Running(task=task, ctx=self._context_for(task), component=component)
        with self._lock:
            self._running[task.token] = running
        logger.debug("claimed %s (attempt %d, %s)", task.describe(), task.attempt, task.kind.value)
        try:
            if component is not None and task.payload_error is None and component.is_async(task.kind):
                if self._event_loop is None:
                    raise RuntimeError("no event loop for an async component")  # guarded by Worker
                self._event_loop.submit(self._run_async(running, component))
            else:
                self._pool.submit(self._run_sync, running)
        except RuntimeError:
            # The pool or loop is already shut down: the lease will expire and the task be re-offered.
            logger.warning("%s arrived while shutting down; leaving it to another worker", task.describe())
            self._finish(running)

    def abandon(self) -> int:
        """Gives up on tasks still running after the shutdown grace; returns how many there were.

        They are told to cancel and their results are dropped; their leases expire and the engine
        offers them to another worker.
        """
        self._abandoned.set()
        with self._lock:
            remaining = list(self._running.values())
        for running in remaining:
            running.ctx.cancelled.set()
            if running.cancel_coroutine is not None:
                running.cancel_coroutine()
        return len(remaining)

    def _context_for(self, task: Task) -> TaskContext:
        lease_deadline = (
            datetime.fromtimestamp(task.lease_deadline, tz=UTC) if task.lease_deadline is not None else None
        )
        return TaskContext(
            task_id=task.task_id,
            pipeline_id=task.pipeline_id,
            node_id=task.node_id,
            node_version=task.node_version,
            component_code=task.component_code,
            component_version=task.component_version,
            kind=task.kind,
            attempt=task.attempt,
            loop=task.loop,
            inner_loop=task.inner_loop,
            retry=task.retry,
            schedule_times=task.schedule_times,
            inputs=MappingProxyType(dict(task.inputs)),
            callback_data=task.callback_data,
            outputs=MappingProxyType(dict(task.outputs)),
            lease_deadline=lease_deadline,
            on_heartbeat=functools.partial(self._heartbeats.request, task.token),
        )

    def _refusal(self, running: _Running) -> Failure | None:
        """Why the task cannot run at all on this worker, if it cannot."""
        task = running.task
        if task.payload_error is not None:
            return Failure(f"ValueError: the task's payload could not be read: {task.payload_error}")
        if running.component is None:
            versions = sorted(version for code, version in self._components if code == task.component_code)
            served = ", ".join(repr(version) for version in versions) or "none"
            return Failure(
                f"LookupError: worker {self._worker_id} has no component {task.component_code!r} "
                f"version {task.component_version!r} (versions served: {served})"
            )
        return None

    def _run_sync(self, running: _Running) -> None:
        handed_over = False
        try:
            outcome: Outcome | None = self._refusal(running)
            if outcome is None and running.component is not None:
                self._heartbeats.track(running.task, running.ctx)
                try:
                    outcome = invoke(running.component, running.ctx)
                finally:
                    self._heartbeats.untrack(running.task.token)
            handed_over = self._hand_to_loop(running, outcome)
            if not handed_over:
                self._ran(running)
                if outcome is not None:
                    self._report(running, outcome)
        except Exception:
            logger.exception("internal error while handling %s", running.task.describe())
        finally:
            if not handed_over:  # otherwise the loop finishes it once reported
                self._finish(running)

    def _hand_to_loop(self, running: _Running, outcome: Outcome | None) -> bool:
        """Has the report loop report `outcome` and finish the task; False without a report loop.

        Outcomes handed over while the loop has not yet taken the earlier ones ride along with them: one
        wake-up of the loop for a burst of finished tasks, not one each.
        """
        report_loop = self._report_loop
        if report_loop is None:
            return False
        with self._handed_lock:
            self._handed.append((running, outcome))
            if len(self._handed) > 1:
                return True  # the loop is already asked to take them
        if not report_loop.call_soon(self._report_handed):
            self.drop_handed()
        return True

    def drop_handed(self) -> None:
        """Outcomes handed over that the report loop never took (it stopped first) are dropped and their tasks
        finished: the worker is past its shutdown, and the engine offers them again when their leases expire."""
        with self._handed_lock:
            stranded, self._handed = self._handed, []
        for running, _ in stranded:
            logger.warning(
                "%s finished after the worker shut down; result dropped (the engine offers the task again "
                "when its lease expires)",
                running.task.describe(),
            )
            self._finish(running)

    def _report_handed(self) -> None:
        """On the report loop: starts reporting every outcome handed over so far."""
        assert self._report_loop is not None
        with self._handed_lock:
            handed, self._handed = self._handed, []
        for running, outcome in handed:
            task = self._report_loop.loop.create_task(self._report_then_finish(running, outcome))
            # A task cancelled before its first step (the loop stopping) never runs its `finally`.
            task.add_done_callback(functools.partial(self._finish_after_report, running))

    def _finish_after_report(self, running: _Running, _task: asyncio.Task[None]) -> None:
        self._finish(running)

    async def _report_then_finish(self, running: _Running, outcome: Outcome | None) -> None:
        try:
            # The slot's credit, then the report, with no await between: the stream's writer runs after both
            # are queued and sends them in one message, which the engine answers in one batch.
            self._ran(running)
            if outcome is not None:
                await self._report_async(running, outcome)
        except Exception:
            logger.exception("internal error while reporting %s", running.task.describe())
        finally:
            self._finish(running)

    async def _run_async(self, running: _Running, component: Component) -> None:
        loop = asyncio.get_running_loop()
        this_task = asyncio.current_task()
        if this_task is not None:
            coroutine_task = this_task

            def cancel_coroutine() -> None:
                loop.call_soon_threadsafe(coroutine_task.cancel)

            running.cancel_coroutine = cancel_coroutine
        handed_over = False
        try:
            self._heartbeats.track(running.task, running.ctx, on_cancel=running.cancel_coroutine)
            try:
                outcome = await invoke_async(component, running.ctx)
            finally:
                self._heartbeats.untrack(running.task.token)
            handed_over = self._hand_to_loop(running, outcome)
            if not handed_over:
                self._ran(running)
                await self._report_async(running, outcome)
        except asyncio.CancelledError:
            if not running.ctx.cancelled.is_set():
                raise  # the loop itself is closing
            logger.info("%s was cancelled; result dropped", running.task.describe())
        except Exception:
            logger.exception("internal error while handling %s", running.task.describe())
        finally:
            if not handed_over:  # otherwise the report loop finishes it once reported
                self._finish(running)

    def _ran(self, running: _Running) -> None:
        with self._lock:
            first = not running.ran
            running.ran = True
        if first and self._on_ran is not None:
            self._on_ran()

    def _finish(self, running: _Running) -> None:
        self._ran(running)
        with self._lock:
            known = self._running.pop(running.task.token, None) is not None
        if known:
            self._on_finished()

    # --- reporting ---------------------------------------------------------------------------------

    def _report(self, running: _Running, outcome: Outcome) -> None:
        """Runs the report flow on this thread, each send a blocking call."""
        flow = self._report_flow(running, outcome)
        send = _next_send(flow, None, None)
        while send is not None:
            try:
                reply = self._deliver(running.task, send.what, self._send_blocking(send))
            except InvalidArgument as refused:
                send = _next_send(flow, None, refused)
            else:
                send = _next_send(flow, reply, None)

    async def _report_async(self, running: _Running, outcome: Outcome) -> None:
        """Runs the report flow on the event loop."""
        flow = self._report_flow(running, outcome)
        send = _next_send(flow, None, None)
        while send is not None:
            try:
                reply = await self._deliver_async(running.task, send.what, self._send_on_loop(send))
            except InvalidArgument as refused:
                send = _next_send(flow, None, refused)
            else:
                send = _next_send(flow, reply, None)

    def _send_blocking(self, send: _Send) -> Callable[[float], Any]:
        return lambda timeout: self._transport.send_report(send.kind, send.request, timeout)

    def _send_on_loop(self, send: _Send) -> Callable[[float], Awaitable[Any]]:
        return lambda timeout: self._transport.send_report_async(send.kind, send.request, timeout, self._pool)

    def _report_flow(self, running: _Running, outcome: Outcome) -> _ReportFlow:
        """What reporting `outcome` sends, in order, whichever thread or loop delivers it."""
        task = running.task
        if running.ctx.cancelled.is_set():
            logger.info("%s was cancelled; result dropped", task.describe())
            return
        if isinstance(outcome, Failure):
            yield from self._failure_flow(running, outcome)
            return
        poll_after_ms = outcome.after_ms if isinstance(outcome, PollAgain) else 0
        await_callback = isinstance(outcome, AwaitCallback)
        try:
            request = complete_request(
                task.token, outputs=outcome.outputs, poll_after_ms=poll_after_ms, await_callback=await_callback
            )
        except (TypeError, ValueError) as error:
            yield from self._failure_flow(
                running, Failure(f"the outputs are not JSON-serialisable: {format_exception(error)}", exception=error)
            )
            return
        try:
            delivered = yield _Send("completion", "complete", request)
        except InvalidArgument as error:
            yield from self._failure_flow(running, Failure(f"the engine refused the outputs: {error.message}"))
            return
        if delivered is not None:
            what = "done" if isinstance(outcome, Done) else "poll again" if poll_after_ms else "await callback"
            logger.debug("reported %s: %s", task.describe(), what)

    def _failure_flow(self, running: _Running, failure: Failure) -> _ReportFlow:
        task = running.task
        logger.info(
            "%s failed%s: %s",
            task.describe(),
            " (retryable)" if failure.retryable else "",
            failure.message,
            exc_info=failure.exception,
        )

        def send(message: str) -> _Send:
            request = fail_request(
                task.token,
                error_message=message,
                retryable=failure.retryable,
                retry_after_ms=failure.retry_after_ms,
            )
            return _Send("failure", "fail", request)

        try:
            yield send(failure.message)
        except InvalidArgument as error:
            if len(failure.message) <= _TRUNCATED_MESSAGE_CHARS:
                logger.error("the engine refused the failure of %s: %s; dropped", task.describe(), error)
                return
            shortened = failure.message[:_TRUNCATED_MESSAGE_CHARS] + " ... (truncated)"
            try:
                yield send(shortened)
            except InvalidArgument as second_error:
                logger.error("the engine refused the failure of %s: %s; dropped", task.describe(), second_error)

    def _deliver(self, task: Task, what: str, call: Callable[[float], T]) -> T | None:
        """Sends one report, retrying transient errors; None if it was dropped.

        Raises InvalidArgument: the caller can send something smaller.
        """
        deadline = time.monotonic() + self._report_timeout
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                return call(self._attempt_timeout(deadline))
            except InvalidArgument:
                raise
            except EngineError as error:
                delay = self._retry_delay(task, what, error, backoff, deadline)
                if delay is None:
                    return None
                if self._abandoned.wait(delay):
                    logger.warning("%s: shutting down, %s not sent", task.describe(), what)
                    return None

    async def _deliver_async(self, task: Task, what: str, call: Callable[[float], Awaitable[T]]) -> T | None:
        """`_deliver` on the event loop."""
        deadline = time.monotonic() + self._report_timeout
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                return await call(self._attempt_timeout(deadline))
            except InvalidArgument:
                raise
            except EngineError as error:
                delay = self._retry_delay(task, what, error, backoff, deadline)
                if delay is None:
                    return None
                if await self._abandoned_within(delay):
                    logger.warning("%s: shutting down, %s not sent", task.describe(), what)
                    return None

    async def _abandoned_within(self, seconds: float) -> bool:
        """`self._abandoned.wait(seconds)` without blocking the loop: looks again every 0.1 s."""
        deadline = time.monotonic() + seconds
        while not self._abandoned.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(remaining, 0.1))
        return True

    def _attempt_timeout(self, deadline: float) -> float:
        return max(0.1, min(self._rpc_timeout, deadline - time.monotonic()))

    def _retry_delay(
        self, task: Task, what: str, error: EngineError, backoff: Backoff, deadline: float
    ) -> float | None:
        """How long to wait before sending a report again after `error`; None when it is dropped."""
        if isinstance(error, FailedPrecondition):
            logger.info("%s: stale token, result dropped (%s)", task.describe(), error.message)
            return None
        if isinstance(error, NotFound):
            logger.warning("%s: the engine no longer knows it, result dropped (%s)", task.describe(), error)
            return None
        if self._abandoned.is_set():
            logger.warning("%s: shutting down, %s not sent (%s)", task.describe(), what, error)
            return None
        if not is_transient(error):
            logger.error("%s: sending the %s failed: %s; dropped", task.describe(), what, error)
            return None
        delay = backoff.next_delay()
        if time.monotonic() + delay > deadline:
            logger.error(
                "%s: gave up sending the %s after %.0f s (%s); the engine will offer the task "
                "again when its lease expires",
                task.describe(),
                what,
                self._report_timeout,
                error,
            )
            return None
        logger.warning("%s: sending the %s failed (%s); retrying in %.1f s", task.describe(), what, error, delay)
        return delay
