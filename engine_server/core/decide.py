"""The scheduler as a function: `decide(snapshot, event, now) -> Decision`.

It is synchronous, has no I/O and never raises for expected input: an event that is not legal in the
snapshot's state comes back as a `Rejection` that says why. The server applies the decision (writes the
new node attempts, offers the tasks) inside one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from engine_server.core.model import NodeRun, NodeSpec, NodeState, NodeType, PipelineState, Snapshot
from engine_server.core.render import RenderError, render_inputs
from engine_server.core.states import ACTIVE_NODE_STATES, can_transition

# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class StartPipeline:
    start_node_id: str = ""


@dataclass(frozen=True, slots=True)
class TaskCompleted:
    node_id: str
    version: str
    outputs: Mapping[str, Any] = field(default_factory=dict)
    poll_after_ms: int = 0
    await_callback: bool = False


@dataclass(frozen=True, slots=True)
class TaskFailed:
    node_id: str
    version: str
    message: str
    outputs: Mapping[str, Any] = field(default_factory=dict)
    retryable: bool = False
    retry_after_ms: int = 0
    # Retries a transient failure may use when the node has no auto_retry of its own.
    transient_retry_budget: int = 0


Event = StartPipeline | TaskCompleted | TaskFailed

# ---------------------------------------------------------------- results


class TaskKind:
    EXECUTE = "execute"
    SCHEDULE = "schedule"


@dataclass(frozen=True, slots=True)
class OfferTask:
    """Make a task of this node attempt available to workers at `available_at`."""

    node_id: str
    version: str
    kind: str
    component_code: str
    component_version: str
    inputs: Mapping[str, Any]
    outputs: Mapping[str, Any]
    loop: int
    inner_loop: int
    retry: int
    schedule_times: int
    available_at: int
    callback_data: Any = None


@dataclass(frozen=True, slots=True)
class CancelTasks:
    """Withdraw the open tasks of a node attempt; a worker holding one learns it through its heartbeat."""

    node_id: str
    version: str
    reason: str


Command = OfferTask | CancelTasks


@dataclass(frozen=True, slots=True)
class StateChange:
    node_id: str  # "" for the pipeline itself
    old_state: str  # "" when the node had no state
    new_state: str
    version: str
    at: int


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: str  # "failed_precondition" | "not_found" | "invalid_argument"
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    snapshot: Snapshot
    changed_node_ids: tuple[str, ...] = ()
    histories: tuple[NodeRun, ...] = ()
    commands: tuple[Command, ...] = ()
    changes: tuple[StateChange, ...] = ()
    rejection: Rejection | None = None

    @property
    def pipeline_changed(self) -> bool:
        return any(change.node_id == "" for change in self.changes)


# ---------------------------------------------------------------- the function


def decide(snapshot: Snapshot, event: Event, now: int) -> Decision:
    step = _Step(snapshot, now)
    if isinstance(event, StartPipeline):
        step.start(event)
    elif isinstance(event, TaskCompleted):
        step.task_completed(event)
    else:
        step.task_failed(event)
    return step.decision()


class _Step:
    """The working copy of one decision: reads the snapshot, collects changes and commands."""

    def __init__(self, snapshot: Snapshot, now: int) -> None:
        self.old = snapshot
        self.spec = snapshot.spec
        self.now = now
        self.nodes: dict[str, NodeRun] = dict(snapshot.nodes)
        self.state = snapshot.state
        self.version_seq = snapshot.version_seq
        self.finished_at = snapshot.finished_at
        self.changed: dict[str, None] = {}
        self.histories: list[NodeRun] = []
        self.commands: list[Command] = []
        self.changes: list[StateChange] = []
        self.rejection: Rejection | None = None

    # ------------------------------------------------------------ bookkeeping

    def decision(self) -> Decision:
        if self.rejection is not None:
            return Decision(self.old, rejection=self.rejection)
        snapshot = replace(
            self.old,
            state=self.state,
            nodes=self.nodes,
            version_seq=self.version_seq,
            finished_at=self.finished_at,
        )
        return Decision(
            snapshot,
            tuple(self.changed),
            tuple(self.histories),
            tuple(self.commands),
            tuple(self.changes),
        )

    def reject(self, kind: str, message: str) -> None:
        self.rejection = Rejection(kind, message)

    def new_version(self) -> str:
        self.version_seq += 1
        return f"v{self.version_seq}"

    def put(self, run: NodeRun) -> None:
        old = self.nodes.get(run.node_id)
        old_state = old.state.value if old is not None else ""
        if not can_transition(old.state if old is not None else None, run.state):
            raise AssertionError(
                f"node {run.node_id}: {old_state or 'no state'} -> {run.state.value} is not a transition"
            )
        if old is None or old.state is not run.state or old.version != run.version:
            self.changes.append(StateChange(run.node_id, old_state, run.state.value, run.version, self.now))
        self.nodes[run.node_id] = run
        self.changed[run.node_id] = None

    def set_pipeline_state(self, state: PipelineState) -> None:
        if state is self.state:
            return
        self.changes.append(StateChange("", self.state.value, state.value, "", self.now))
        self.state = state
        if state in (PipelineState.FINISHED, PipelineState.REVOKED, PipelineState.FAILED):
            self.finished_at = self.now

    def current_attempt(self, node_id: str, version: str) -> NodeRun | None:
        """The node's RUNNING attempt of `version`, or None after rejecting the event."""
        run = self.nodes.get(node_id)
        if run is None:
            self.reject("not_found", f"node {node_id!r} has not run in pipeline {self.old.pipeline_id!r}")
            return None
        if run.version != version:
            self.reject(
                "failed_precondition",
                f"node {node_id!r} is at version {run.version}, not {version}: the result is for an older attempt",
            )
            return None
        if run.state is not NodeState.RUNNING:
            self.reject(
                "failed_precondition",
                f"node {node_id!r} is {run.state.value}, so it cannot take a task result",
            )
            return None
        if self.state is not PipelineState.RUNNING and self.state is not PipelineState.SUSPENDED:
            self.reject(
                "failed_precondition",
                f"pipeline {self.old.pipeline_id!r} is {self.state.value}, so it takes no more task results",
            )
            return None
        return run

    # ------------------------------------------------------------ events

    def start(self, event: StartPipeline) -> None:
        if self.nodes:
            self.reject("failed_precondition", f"pipeline {self.old.pipeline_id!r} has already started")
            return
        first = event.start_node_id or self.spec.start_event_id
        if first not in self.spec.nodes:
            self.reject("invalid_argument", f"start node {first!r} is not a node of the tree")
            return
        self.set_pipeline_state(PipelineState.RUNNING)
        self.walk([first])

    def task_completed(self, event: TaskCompleted) -> None:
        run = self.current_attempt(event.node_id, event.version)
        if run is None:
            return
        outputs = {**run.outputs, **event.outputs}
        if event.poll_after_ms > 0:
            run = replace(run, outputs=outputs, schedule_times=run.schedule_times + 1, awaiting_callback=False)
            self.put(run)
            self.offer(run, TaskKind.SCHEDULE, available_at=self.now + event.poll_after_ms)
            return
        if event.await_callback:
            self.put(replace(run, outputs=outputs, awaiting_callback=True))
            return
        outputs["_result"] = True
        self.put(replace(run, state=NodeState.FINISHED, outputs=outputs, finished_at=self.now, awaiting_callback=False))
        self.walk(self.spec.next_node_ids(run.node_id))

    def task_failed(self, event: TaskFailed) -> None:
        run = self.current_attempt(event.node_id, event.version)
        if run is None:
            return
        node = self.spec.nodes[run.node_id]
        outputs = {**run.outputs, **event.outputs, "_result": False, "ex_data": event.message}
        failed = replace(run, state=NodeState.FAILED, outputs=outputs, finished_at=self.now, awaiting_callback=False)
        retry_budget = node.auto_retry_times or (event.transient_retry_budget if event.retryable else 0)
        if run.retry < retry_budget:
            delay = max(event.retry_after_ms, node.auto_retry_interval_ms)
            self.retry(failed, available_at=self.now + delay)
            return
        if node.error_ignorable:
            self.put(replace(failed, state=NodeState.FINISHED, error_ignored=True))
            self.walk(self.spec.next_node_ids(run.node_id))
            return
        self.put(failed)
        self.settle_failure()

    # ------------------------------------------------------------ movement

    def retry(self, failed: NodeRun, *, available_at: int) -> None:
        """The failed attempt goes to history; a new attempt with the same inputs runs."""
        self.histories.append(failed)
        self.put(failed)  # records the FAILED step for watchers
        attempt = replace(
            failed,
            state=NodeState.RUNNING,
            version=self.new_version(),
            retry=failed.retry + 1,
            outputs={},
            schedule_times=0,
            started_at=self.now,
            finished_at=0,
        )
        self.put(attempt)
        self.offer(attempt, TaskKind.EXECUTE, available_at=available_at)

    def walk(self, node_ids: list[str]) -> None:
        """Moves the path forward through nodes the engine runs itself, until each path reaches a task."""
        pending = list(reversed(node_ids))
        while pending:
            node = self.spec.nodes[pending.pop()]
            if node.type is NodeType.SERVICE_ACTIVITY:
                self.enter_activity(node)
            elif node.type is NodeType.EMPTY_START_EVENT:
                self.put(self.new_run(node, NodeState.FINISHED))
                pending.extend(reversed(self.spec.next_node_ids(node.id)))
            elif node.type is NodeType.EMPTY_END_EVENT:
                self.put(self.new_run(node, NodeState.FINISHED))
                self.set_pipeline_state(PipelineState.FINISHED)
            else:  # validation refuses every other type until the engine runs it
                raise AssertionError(f"node type {node.type} passed validation but cannot run")

    def new_run(self, node: NodeSpec, state: NodeState) -> NodeRun:
        done = state is NodeState.FINISHED
        return NodeRun(
            node_id=node.id,
            state=state,
            version=self.new_version(),
            started_at=self.now,
            finished_at=self.now if done else 0,
            outputs={"_result": True} if done else {},
        )

    def enter_activity(self, node: NodeSpec) -> None:
        run = self.new_run(node, NodeState.RUNNING)
        try:
            inputs = render_inputs(node.inputs, self.old.context)
        except RenderError as exc:
            message = f"cannot render the inputs of {node.id!r}: {exc}"
            self.put(
                replace(
                    run,
                    state=NodeState.FAILED,
                    finished_at=self.now,
                    outputs={"_result": False, "ex_data": message},
                )
            )
            self.settle_failure()
            return
        inputs["_loop"] = run.loop
        inputs["_inner_loop"] = run.inner_loop
        run = replace(run, inputs=inputs)
        self.put(run)
        self.offer(run, TaskKind.EXECUTE, available_at=self.now)

    def offer(self, run: NodeRun, kind: str, *, available_at: int, callback_data: Any = None) -> None:
        node = self.spec.nodes[run.node_id]
        self.commands.append(
            OfferTask(
                node_id=run.node_id,
                version=run.version,
                kind=kind,
                component_code=node.component_code,
                component_version=node.component_version,
                inputs=run.inputs,
                outputs=run.outputs,
                loop=run.loop,
                inner_loop=run.inner_loop,
                retry=run.retry,
                schedule_times=run.schedule_times,
                available_at=available_at,
                callback_data=callback_data,
            )
        )

    def settle_failure(self) -> None:
        """A pipeline fails once a node failed and no other node can still make progress."""
        if not any(run.state in ACTIVE_NODE_STATES for run in self.nodes.values()):
            self.set_pipeline_state(PipelineState.FAILED)
