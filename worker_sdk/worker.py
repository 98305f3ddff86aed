"""The worker: long-polls the engine for tasks of its components and runs them.

    worker = Worker("localhost:50051", [add, WaitForJob])
    worker.run()  # until SIGTERM / SIGINT / worker.stop()

Roles, each in its own module: the poll loop (here) claims only as many tasks as there are free
slots; `_executor` runs them and reports results; `_heartbeat` keeps their leases alive and tells
them when to cancel. The poll loop survives any error: an unreachable engine is retried with
exponential backoff and jitter, logged once per outage and once on reconnection.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import Literal

import grpc

from worker_sdk._backoff import Backoff
from worker_sdk._executor import TaskExecutor
from worker_sdk._heartbeat import HeartbeatManager
from worker_sdk._models import Task
from worker_sdk._stream import StreamingTransport, StreamSession
from worker_sdk._threads import DaemonThreadPool, EventLoopThread
from worker_sdk._transport import (
    ChannelOptions,
    Metadata,
    PollCall,
    WorkerTransport,
    open_aio_channel,
    open_channel,
)
from worker_sdk.component import Component
from worker_sdk.context import TaskKind
from worker_sdk.errors import EngineError, Unimplemented, is_transient

__all__ = ["Worker"]

logger = logging.getLogger("worker_sdk")

# Extra time a long poll may take beyond its wait before the client gives up on the connection.
_POLL_DEADLINE_SLACK = 10.0
_RECONNECT_INITIAL_BACKOFF = 0.1
_MIN_EMPTY_POLL_SECONDS = 0.05


def _instantiate(component: Component | type[Component]) -> Component:
    instance = component() if isinstance(component, type) else component
    if not isinstance(instance, Component):
        raise TypeError(f"{component!r} is not a component: decorate a function with @component or subclass Component")
    code = getattr(instance, "code", None)
    if not isinstance(code, str) or not code:
        raise TypeError(f"component {type(instance).__name__} needs a non-empty `code` class attribute")
    if not isinstance(instance.version, str) or not instance.version:
        raise TypeError(f"component {code!r} needs a non-empty `version`")
    return instance


def _registry(components: Sequence[Component | type[Component]]) -> dict[tuple[str, str], Component]:
    registry: dict[tuple[str, str], Component] = {}
    for item in components:
        instance = _instantiate(item)
        key = (instance.code, instance.version)
        if key in registry:
            raise ValueError(f"component {key[0]!r} version {key[1]!r} is registered twice")
        registry[key] = instance
    if not registry:
        raise ValueError("a Worker needs at least one component")
    return registry


class Worker:
    """Serves the given components until stopped.

    Args:
        target: the engine's address, ``"host:port"``.
        components: functions decorated with `@component`, `Component` subclasses (created without
            arguments) or `Component` instances.
        concurrency: the most tasks in flight at once, from claim to report.
        worker_id: shown in the engine's logs and state; ``"host:pid"`` by default.
        poll_wait_ms: how long one long poll waits for work (the server caps it).
        heartbeat_interval: seconds between heartbeats of a task; by default a third of its
            remaining lease.
        max_reconnect_backoff: the longest pause, in seconds, between attempts to reach an
            unreachable engine.
        shutdown_grace: seconds that running tasks get to finish once the worker is stopping.
        report_timeout: how long, in seconds, a result is retried through transient errors.
        rpc_timeout: deadline, in seconds, of each heartbeat and report call.
        metadata: sent with every call, e.g. ``[("authorization", "Bearer <token>")]``.
        credentials: TLS channel credentials; plaintext when None.
        channel_options: extra gRPC channel options (they win over the SDK's defaults).
        transport: ``"stream"`` (default) receives tasks and sends results on one `TaskStream`
            call, the fast way; ``"poll"`` uses the long-poll and unary calls only. A server without
            TaskStream makes a streaming worker fall back to polling.
        freeze_gc: while `run()` runs on the main thread, leave every object that exists when it
            begins (modules, components, their caches) out of the garbage collector's scans: it
            collects once, then calls `gc.freeze()`, and `gc.unfreeze()` when it returns. Each full
            collection otherwise walks all of them while every task's result waits: 11-32 ms a time
            in the benchmark's workers, under 10 ms with this. Objects are still freed as usual. A
            worker started with `start()` or ``with Worker(...)`` never touches the collector; nor
            does False.
    """

    def __init__(
        self,
        target: str,
        components: Sequence[Component | type[Component]],
        *,
        concurrency: int = 8,
        worker_id: str | None = None,
        poll_wait_ms: int = 20000,
        heartbeat_interval: float | None = None,
        max_reconnect_backoff: float = 10.0,
        shutdown_grace: float = 30.0,
        report_timeout: float = 60.0,
        rpc_timeout: float = 10.0,
        metadata: Metadata = (),
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: ChannelOptions = (),
        transport: Literal["stream", "poll"] = "stream",
        freeze_gc: bool = True,
    ) -> None:
        if transport not in ("stream", "poll"):
            raise ValueError(f"transport must be 'stream' or 'poll', got {transport!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if poll_wait_ms < 0:
            raise ValueError(f"poll_wait_ms must be >= 0, got {poll_wait_ms}")
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval}")
        if max_reconnect_backoff < _RECONNECT_INITIAL_BACKOFF:
            raise ValueError(f"max_reconnect_backoff must be at least {_RECONNECT_INITIAL_BACKOFF}")
        self.target = target
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._components = _registry(components)
        self.component_codes: tuple[str, ...] = tuple(sorted({code for code, _ in self._components}))
        self._concurrency = concurrency
        self._poll_wait_ms = poll_wait_ms
        self._heartbeat_interval = heartbeat_interval
        self._max_reconnect_backoff = max_reconnect_backoff
        self._shutdown_grace = shutdown_grace
        self._report_timeout = report_timeout
        self._rpc_timeout = rpc_timeout
        self._metadata = tuple(metadata)
        self._credentials = credentials
        self._channel_options = tuple(channel_options)
        self._use_stream = transport == "stream"
        self._freeze_gc = freeze_gc

        # A reentrant lock: `stop()` may run inside a signal handler that interrupted this very
        # thread while it held the lock.
        self._state = threading.Condition(threading.RLock())
        self._ran = False
        self._stopping = False
        self._forced = False
        self._stop_signal: int | None = None
        self._in_flight = 0
        # Tasks whose component has not returned yet (a part of `_in_flight`); the stream's credit is what's left.
        self._running_components = 0
        self._poll_call: PollCall | None = None
        self._session: StreamSession | None = None
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Polls and runs tasks until `stop()` (or SIGTERM / SIGINT on the main thread), then waits
        up to `shutdown_grace` for running tasks to finish and returns."""
        with self._state:
            if self._ran:
                raise RuntimeError("a Worker can run only once; create a new one")
            self._ran = True
        restore_signals = self._install_signal_handlers()
        channel = open_channel(
            self.target,
            credentials=self._credentials,
            options=self._channel_options,
            max_reconnect_backoff=self._max_reconnect_backoff,
        )
        transport = (
            StreamingTransport(channel, self._metadata)
            if self._use_stream
            else WorkerTransport(channel, self._metadata)
        )
        heartbeats = HeartbeatManager(transport, fixed_interval=self._heartbeat_interval, rpc_timeout=self._rpc_timeout)
        # On a stream a slot frees when the component returns, while its result may still be reporting:
        # room for `concurrency` of each.
        threads = self._concurrency * 2 if self._use_stream else self._concurrency
        pool = DaemonThreadPool(threads, thread_name_prefix="worker_sdk-task")
        needs_loop = any(c.is_async(kind) for c in self._components.values() for kind in TaskKind)
        event_loop = EventLoopThread("worker_sdk-asyncio") if needs_loop else None
        # The task stream's own loop: it runs no component, so one that blocks cannot stall the stream.
        stream_loop = EventLoopThread("worker_sdk-stream") if self._use_stream else None
        executor = TaskExecutor(
            components=self._components,
            transport=transport,
            heartbeats=heartbeats,
            pool=pool,
            event_loop=event_loop,
            worker_id=self.worker_id,
            rpc_timeout=self._rpc_timeout,
            report_timeout=self._report_timeout,
            on_finished=self._release_slot,
            on_ran=self._component_returned,
            report_loop=stream_loop,
        )
        stream_channel: grpc.aio.Channel | None = None
        froze_gc = self._freeze_gc and threading.current_thread() is threading.main_thread()
        if froze_gc:
            gc.collect()
            gc.freeze()
        try:
            heartbeats.start()
            for loop_thread in (event_loop, stream_loop):
                if loop_thread is not None:
                    loop_thread.start()
            logger.info(
                "worker %s serving %s from %s (concurrency %d)",
                self.worker_id,
                ", ".join(self.component_codes),
                self.target,
                self._concurrency,
            )
            streamed = False
            if isinstance(transport, StreamingTransport) and stream_loop is not None:
                stream_channel = stream_loop.submit(self._open_stream_channel()).result()
                streamed = self._stream_until_stopped(transport, executor, stream_loop, stream_channel)
            if not streamed:
                self._poll_until_stopped(transport, executor)
            self._drain(executor)
        finally:
            heartbeats.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            if event_loop is not None:
                event_loop.stop()
            if stream_loop is not None:
                if stream_channel is not None:
                    with contextlib.suppress(Exception):
                        stream_loop.submit(stream_channel.close()).result(5.0)
                stream_loop.stop()
                executor.drop_handed()  # handed over as the loop stopped: nothing will report them now
            channel.close()
            restore_signals()
            if froze_gc:
                gc.unfreeze()  # the program goes on after run(): its collector is as it was
            self._finished.set()
            logger.info("worker %s stopped", self.worker_id)

    def start(self) -> None:
        """Runs the worker on a background thread (no signal handlers); see `stop` and `join`."""
        with self._state:
            if self._thread is not None:
                raise RuntimeError("the worker was already started")
            self._thread = threading.Thread(target=self._run_in_thread, name="worker_sdk-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops polling and lets running tasks finish (within `shutdown_grace`). Safe from any
        thread and from signal handlers; returns at once (use `join` to wait)."""
        with self._state:
            self._stopping = True
            call = self._poll_call
            session = self._session
            self._state.notify_all()
        if call is not None:
            call.cancel()
        if session is not None:
            session.interrupt()

    def join(self, timeout: float | None = None) -> bool:
        """Waits until the worker has stopped; False if `timeout` ran out first."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return self._finished.wait(timeout)

    @property
    def running(self) -> bool:
        return self._ran and not self._finished.is_set()

    def __enter__(self) -> Worker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self.join()

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except Exception:
            logger.exception("worker %s crashed", self.worker_id)

    # --- signals -----------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {signum: signal.getsignal(signum) for signum in handled}

        def handle(signum: int, frame: FrameType | None) -> None:
            # No logging here: a handler interrupts this thread mid-write. The loops log it.
            with self._state:
                if self._stopping:
                    self._forced = True  # a second signal: stop waiting for running tasks
                self._stop_signal = signum
            self.stop()

        for signum in handled:
            signal.signal(signum, handle)

        def restore() -> None:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return restore

    # --- the task stream ---------------------------------------------------------------------------

    async def _open_stream_channel(self) -> grpc.aio.Channel:
        # An asyncio channel belongs to the loop it is created on.
        return open_aio_channel(
            self.target,
            credentials=self._credentials,
            options=self._channel_options,
            max_reconnect_backoff=self._max_reconnect_backoff,
        )

    def _stream_until_stopped(
        self,
        transport: StreamingTransport,
        executor: TaskExecutor,
        stream_loop: EventLoopThread,
        channel: grpc.aio.Channel,
    ) -> bool:
        """Receives tasks on a TaskStream, reopening it after errors; False if the server lacks it.

        The stream runs on the event loop; this thread waits for it to end and decides what next.
        """
        backoff = Backoff(_RECONNECT_INITIAL_BACKOFF, self._max_reconnect_backoff)
        outage_since: float | None = None

        def take(tasks: list[Task]) -> None:  # on the loop
            nonlocal outage_since
            if outage_since is not None:
                self._log_reconnected(outage_since)
                outage_since = None
            backoff.reset()
            # Claimed tasks run even when stopping began meanwhile: they are ours until reported.
            with self._state:
                self._in_flight += len(tasks)
                self._running_components += len(tasks)
            for task in tasks:
                executor.submit(task)

        while True:
            with self._state:
                if self._stopping:
                    break
                # Slots freed from here on are granted on this session (see _component_returned).
                session = StreamSession(
                    channel,
                    stream_loop,
                    metadata=self._metadata,
                    worker_id=self.worker_id,
                    component_codes=self.component_codes,
                    credit=self._concurrency - self._running_components,
                )
                self._session = session
            transport.attach(session)
            try:
                stream_loop.submit(session.run(take)).result()
            except Unimplemented:
                logger.info("the engine at %s has no TaskStream; long-polling instead", self.target)
                return False
            except Exception as error:
                if self._is_stopping():
                    break
                if outage_since is None:
                    outage_since = time.monotonic()
                    self._log_poll_failure(error)
                else:
                    logger.debug("the task stream still fails: %s", error)
                self._sleep_unless_stopping(backoff.next_delay())
            finally:
                transport.attach(None)
                with self._state:
                    self._session = None
                session.interrupt()
        self._log_stopping()
        return True

    def _log_reconnected(self, outage_since: float) -> None:
        logger.info(
            "worker %s reconnected to %s after %.1f s", self.worker_id, self.target, time.monotonic() - outage_since
        )

    def _log_stopping(self) -> None:
        with self._state:
            signum = self._stop_signal
        reason = f"received {signal.Signals(signum).name}" if signum is not None else "stop requested"
        logger.info("worker %s stopping (%s): polling ended", self.worker_id, reason)

    # --- polling -----------------------------------------------------------------------------------

    def _poll_until_stopped(self, transport: WorkerTransport, executor: TaskExecutor) -> None:
        backoff = Backoff(_RECONNECT_INITIAL_BACKOFF, self._max_reconnect_backoff)
        outage_since: float | None = None
        while True:
            free_slots = self._wait_for_free_slots()
            if free_slots == 0:
                break
            poll_started = time.monotonic()
            try:
                tasks = self._poll_once(transport, free_slots)
            except Exception as error:
                if self._is_stopping():
                    break
                if outage_since is None:
                    outage_since = time.monotonic()
                    self._log_poll_failure(error)
                else:
                    logger.debug("polling still failing: %s", error)
                self._sleep_unless_stopping(backoff.next_delay())
                continue
            if outage_since is not None:
                self._log_reconnected(outage_since)
                outage_since = None
            backoff.reset()
            if not tasks:
                # A server that answers empty polls at once (or wait_ms=0) must not make this spin.
                self._sleep_unless_stopping(_MIN_EMPTY_POLL_SECONDS - (time.monotonic() - poll_started))
                continue
            # Claimed tasks run even when stopping began meanwhile: they are ours until reported.
            with self._state:
                self._in_flight += len(tasks)
                self._running_components += len(tasks)
            for task in tasks:
                executor.submit(task)
        self._log_stopping()

    def _poll_once(self, transport: WorkerTransport, max_tasks: int) -> list[Task]:
        call = transport.poll(
            worker_id=self.worker_id,
            component_codes=self.component_codes,
            max_tasks=max_tasks,
            wait_ms=self._poll_wait_ms,
            timeout=self._poll_wait_ms / 1000.0 + _POLL_DEADLINE_SLACK,
        )
        with self._state:
            self._poll_call = call
            stopping = self._stopping
        if stopping:
            call.cancel()
        try:
            return call.result()
        finally:
            with self._state:
                self._poll_call = None

    def _log_poll_failure(self, error: Exception) -> None:
        if isinstance(error, EngineError) and is_transient(error):
            logger.warning(
                "engine at %s is unreachable (%s); retrying with backoff up to %.1f s",
                self.target,
                error,
                self._max_reconnect_backoff,
            )
        elif isinstance(error, EngineError):
            logger.error("polling %s failed: %s; retrying with backoff", self.target, error)
        else:
            logger.exception("polling %s failed unexpectedly; retrying with backoff", self.target)

    # --- slots and shutdown ------------------------------------------------------------------------

    def _wait_for_free_slots(self) -> int:
        """Blocks until a slot is free; 0 once the worker is stopping."""
        with self._state:
            while not self._stopping and self._in_flight >= self._concurrency:
                self._state.wait()
            return 0 if self._stopping else self._concurrency - self._in_flight

    def _component_returned(self) -> None:
        """A slot is free as soon as the component returns: on a stream, the credit for the next task goes out
        with (just before) this task's report, so the engine can hand it over in the same batch."""
        with self._state:
            self._running_components -= 1
            if self._session is not None:
                self._session.grant(1)

    def _release_slot(self) -> None:
        with self._state:
            self._in_flight -= 1
            self._state.notify_all()

    def _is_stopping(self) -> bool:
        with self._state:
            return self._stopping

    def _sleep_unless_stopping(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._state:
            while not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._state.wait(remaining)

    def _drain(self, executor: TaskExecutor) -> None:
        deadline = time.monotonic() + self._shutdown_grace
        with self._state:
            if self._in_flight:
                logger.info(
                    "waiting up to %.0f s for %d running task(s) to finish", self._shutdown_grace, self._in_flight
                )
            while self._in_flight and not self._forced:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._state.wait(remaining)
            left = self._in_flight
            forced = self._forced
        if left:
            abandoned = executor.abandon()
            logger.warning(
                "%d task(s) still running %s; cancelled and abandoned "
                "(the engine offers them again when their leases expire)",
                abandoned,
                "when a second signal forced the stop" if forced else "after the shutdown grace",
            )
