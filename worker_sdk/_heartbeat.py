"""One thread that keeps the leases of all running tasks alive.

Each task is heartbeated at a throttled interval (by default a third of its remaining lease, as
the protocol recommends). When the engine answers `cancel_requested`, or refuses the token because
the lease is gone, the task's `cancelled` event is set and it is no longer heartbeated; the
executor then drops whatever the task produces.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker_sdk._models import Task
from worker_sdk._transport import WorkerTransport, encode_json
from worker_sdk.context import TaskContext
from worker_sdk.errors import EngineError, FailedPrecondition, NotFound, is_transient

logger = logging.getLogger("worker_sdk")

# A lease far shorter than a network round trip cannot be kept alive anyway; this floor also stops
# a worker whose clock runs ahead of the server's from heartbeating in a tight loop.
_MIN_INTERVAL = 0.2
# `ctx.heartbeat()` may be called in a hot loop; at most this often does it reach the server.
_MIN_SPACING = 0.5
# Used when the server sends no lease deadline at all.
_FALLBACK_INTERVAL = 10.0
# After a transient failure, try again this soon (or at the normal interval if that is sooner).
_RETRY_AFTER_ERROR = 1.0


@dataclass(eq=False)
class _Lease:
    task: Task
    ctx: TaskContext
    on_cancel: Callable[[], None] | None
    lease_deadline: float | None
    next_due: float
    last_sent: float = -math.inf
    progress_json: str = ""
    sending: bool = False
    forced: bool = False  # a heartbeat was requested while one was in flight


class HeartbeatManager:
    def __init__(self, transport: WorkerTransport, *, fixed_interval: float | None, rpc_timeout: float) -> None:
        if fixed_interval is not None and fixed_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {fixed_interval}")
        self._transport = transport
        self._fixed_interval = fixed_interval
        self._rpc_timeout = rpc_timeout
        self._leases: dict[str, _Lease] = {}
        self._cond = threading.Condition()
        # When the manager's thread wakes up by itself (inf: never; None: it is not waiting). Tracking a task
        # wakes it only for an earlier heartbeat: a wake-up per task cost a worker as much as the task.
        self._sleeping_until: float | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="worker_sdk-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=self._rpc_timeout + 1.0)

    def track(self, task: Task, ctx: TaskContext, on_cancel: Callable[[], None] | None = None) -> None:
        """Starts heartbeating `task`; `on_cancel` runs (on this manager's thread) if it must stop."""
        lease = _Lease(
            task=task,
            ctx=ctx,
            on_cancel=on_cancel,
            lease_deadline=task.lease_deadline,
            next_due=time.monotonic() + self._interval(task.lease_deadline),
        )
        with self._cond:
            self._leases[task.token] = lease
            self._wake_for(lease.next_due)

    def untrack(self, token: str) -> None:
        with self._cond:
            self._leases.pop(token, None)

    def request(self, token: str, progress: Any = None) -> None:
        """Heartbeats the task soon (coalesced), carrying `progress` if given.

        Raises TypeError / ValueError in the caller when `progress` is not JSON-serialisable.
        """
        progress_json = encode_json(progress) if progress is not None else None
        with self._cond:
            lease = self._leases.get(token)
            if lease is None:
                return
            if progress_json is not None:
                lease.progress_json = progress_json
            if lease.sending:
                lease.forced = True
                return
            lease.next_due = min(lease.next_due, max(time.monotonic(), lease.last_sent + _MIN_SPACING))
            self._wake_for(lease.next_due)

    def _wake_for(self, due: float) -> None:
        """Holds `_cond`."""
        if self._sleeping_until is not None and due < self._sleeping_until:
            self._cond.notify_all()

    def _interval(self, lease_deadline: float | None) -> float:
        if self._fixed_interval is not None:
            return self._fixed_interval
        if lease_deadline is None:
            return _FALLBACK_INTERVAL
        return max(_MIN_INTERVAL, (lease_deadline - time.time()) / 3)

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._wait_for_due()
                if due is None:
                    return
                now = time.monotonic()
                batch: list[tuple[_Lease, str]] = []
                for lease in due:
                    lease.sending = True
                    lease.forced = False
                    lease.last_sent = now
                    batch.append((lease, lease.progress_json))
            for lease, progress_json in batch:
                self._send(lease, progress_json)

    def _wait_for_due(self) -> list[_Lease] | None:
        """Blocks until some leases are due, or returns None once stopped. Holds `_cond`."""
        while not self._stopped:
            now = time.monotonic()
            idle = [lease for lease in self._leases.values() if not lease.sending]
            due = [lease for lease in idle if lease.next_due <= now]
            if due:
                return due
            earliest = min((lease.next_due for lease in idle), default=None)
            self._sleeping_until = math.inf if earliest is None else earliest
            try:
                self._cond.wait(None if earliest is None else earliest - now)
            finally:
                self._sleeping_until = None
        return None

    def _send(self, lease: _Lease, progress_json: str) -> None:
        task = lease.task
        try:
            reply = self._transport.heartbeat(task.token, progress_json=progress_json, timeout=self._rpc_timeout)
        except (FailedPrecondition, NotFound) as error:
            self._cancel(lease, f"lease lost ({error})", logging.WARNING)
            return
        except EngineError as error:
            level = logging.DEBUG if is_transient(error) else logging.WARNING
            logger.log(level, "heartbeat for %s failed: %s; will retry", task.describe(), error)
            self._reschedule(lease, min(_RETRY_AFTER_ERROR, self._interval(lease.lease_deadline)))
            return
        except Exception:
            logger.exception("heartbeat for %s failed unexpectedly; will retry", task.describe())
            self._reschedule(lease, _RETRY_AFTER_ERROR)
            return
        if reply.cancel_requested:
            self._cancel(lease, f"the engine asked to cancel ({reply.cancel_reason or 'no reason given'})")
            return
        if reply.lease_deadline is not None:
            lease.lease_deadline = reply.lease_deadline
        self._reschedule(lease, None)

    def _reschedule(self, lease: _Lease, delay: float | None) -> None:
        with self._cond:
            lease.sending = False
            if self._leases.get(lease.task.token) is not lease:
                return  # finished while the heartbeat was in flight
            if lease.forced:
                delay = _MIN_SPACING if delay is None else min(delay, _MIN_SPACING)
            elif delay is None:
                delay = self._interval(lease.lease_deadline)
            lease.forced = False
            lease.next_due = time.monotonic() + delay
            self._cond.notify_all()

    def _cancel(self, lease: _Lease, reason: str, level: int = logging.INFO) -> None:
        with self._cond:
            lease.sending = False
            if self._leases.get(lease.task.token) is not lease:
                return
            del self._leases[lease.task.token]
        logger.log(level, "%s: %s; stopping it, its result will be dropped", lease.task.describe(), reason)
        lease.ctx.cancelled.set()
        if lease.on_cancel is not None:
            try:
                lease.on_cancel()
            except Exception:
                logger.exception("cancelling %s failed", lease.task.describe())
