"""The SDK's own view of worker-protocol messages; `_transport` converts protobuf to and from these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker_sdk.context import TaskKind


@dataclass(frozen=True, kw_only=True)
class Task:
    """A claimed task, as PollTasks returned it."""

    task_id: str
    token: str
    pipeline_id: str
    node_id: str
    node_version: str
    component_code: str
    component_version: str
    kind: TaskKind
    inputs: Mapping[str, Any]
    attempt: int
    loop: int
    inner_loop: int
    retry: int
    schedule_times: int
    callback_data: Any
    outputs: Mapping[str, Any]
    lease_deadline: float | None
    """Unix seconds; None when the server did not say."""
    payload_error: str | None = None
    """Set when a JSON payload of the task could not be read; the task is failed with it."""

    def describe(self) -> str:
        """Identifies the task in log lines."""
        return f"task {self.task_id} ({self.component_code}, pipeline {self.pipeline_id}, node {self.node_id})"


@dataclass(frozen=True)
class HeartbeatReply:
    lease_deadline: float | None
    cancel_requested: bool
    cancel_reason: str
