"""What a running component can learn about its task, and how it talks back (heartbeat, cancellation).

The worker puts a `TaskContext` in a context variable before it calls a component, so
`current_task()` works anywhere below the call: in the component's thread, in helpers it calls, in
asyncio tasks it creates, and in `asyncio.to_thread` / `loop.run_in_executor` helpers that copy the
context. (A bare `threading.Thread` the component starts itself does not inherit context variables.)
"""

from __future__ import annotations

import contextvars
import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from worker_sdk.errors import TaskCancelled

__all__ = ["TaskContext", "TaskKind", "current_task"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


class TaskKind(enum.StrEnum):
    """Why the engine offered the task."""

    EXECUTE = "execute"
    """First run of a node attempt: the component's `execute` is called."""
    SCHEDULE = "schedule"
    """A later run of the same attempt, after `PollAgain` or when a callback arrived."""


@dataclass(frozen=True, kw_only=True, eq=False)
class TaskContext:
    """The task a component is running, plus heartbeat and cancellation.

    Every field has a default, so tests can build one directly: ``TaskContext(inputs={"a": 1})``.
    """

    task_id: str = ""
    pipeline_id: str = ""
    node_id: str = ""
    node_version: str = ""
    """The node attempt's version; a client passes it to `EngineClient.callback`."""
    component_code: str = ""
    component_version: str = "legacy"
    kind: TaskKind = TaskKind.EXECUTE
    attempt: int = 1
    """How many times this task has been offered (more than 1 after an expired lease)."""
    loop: int = 1
    inner_loop: int = 1
    retry: int = 0
    schedule_times: int = 0
    """For schedule tasks: how many schedule runs happened before this one."""
    inputs: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    callback_data: Any = None
    """For a schedule task after a client callback: its data, parsed from JSON. None otherwise."""
    outputs: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    """Outputs kept by earlier runs of this attempt (`PollAgain` / `AwaitCallback`)."""
    lease_deadline: datetime | None = None
    """When the lease ended at claim time (UTC); the worker's heartbeats keep extending it."""
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    """Set when the task should stop; any result it produces afterwards is dropped."""
    on_heartbeat: Callable[[Any], None] | None = field(default=None, repr=False)
    """Set by the worker; tests may pass a recorder to observe `heartbeat()` calls."""

    def heartbeat(self, progress: Any = None) -> None:
        """Asks the worker to send a heartbeat soon, with an optional JSON-serialisable progress note.

        Heartbeats are sent in the background anyway; call this to report progress or after a
        long blocking step. Calls are coalesced, so calling it often is cheap.
        """
        if self.on_heartbeat is not None:
            self.on_heartbeat(progress)

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def raise_if_cancelled(self) -> None:
        """Raises `TaskCancelled` once the task should stop; call it between steps of long work."""
        if self.cancelled.is_set():
            raise TaskCancelled(f"task {self.task_id} of node {self.node_id} was cancelled")


_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("worker_sdk_current_task")


def current_task() -> TaskContext:
    """The context of the task being run by the calling code.

    Raises RuntimeError outside of a component call.
    """
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_task() was called outside of a running component") from None


def activate(context: TaskContext) -> contextvars.Token[TaskContext]:
    """Makes `context` the current task until `deactivate` is called with the returned token."""
    return _current.set(context)


def deactivate(token: contextvars.Token[TaskContext]) -> None:
    _current.reset(token)
