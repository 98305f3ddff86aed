"""The scheduler as a function: `decide(snapshot, event, now) -> Decision`.

It is synchronous, has no I/O and never raises for expected input: an event that is not legal in the
snapshot's state comes back as a `Rejection` that says why. The server applies the decision (writes the
new node attempts, offers the tasks) inside one transaction.

How a pipeline moves: a *path* arrives at a node. Events, gateways, converge gateways and subprocesses are
evaluated here at once; activities and executable end events become tasks and the path waits for their
result. A parallel fork sends one path down each branch and records a `Join`; the fork's converge gateway
lets the path on once every branch has arrived. A path remembers its open forks (`NodeRun.forks`), so a
converge gateway that merges exclusive branches simply lets each arrival through.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine_server.core.expressions import (
    ExpressionError,
    cached_condition,
    cached_splice,
)
from engine_server.core.frozen import evolve, fast_init
from engine_server.core.lazy import LazyError, resolve_lazy
from engine_server.core.model import (
    END_EVENTS,
    FAILURE_HANDLER_NODE,
    FAILURE_HANDLER_VERSION,
    TASK_NODES,
    FailureHandler,
    Join,
    NodeRun,
    NodeSpec,
    NodeState,
    NodeType,
    PipelineState,
    Snapshot,
    VarSpec,
)
from engine_server.core.states import ACTIVE_NODE_STATES, can_transition, can_transition_pipeline

# ---------------------------------------------------------------- events


@fast_init
@dataclass(frozen=True, slots=True)
class StartPipeline:
    start_node_id: str = ""
    # The whole pipeline is revoked if it has not ended this long after it started (0 = never).
    timeout_ms: int = 0
    # A component code to run once when the pipeline fails ("" = none).
    failure_handler: str = ""


@fast_init
@dataclass(frozen=True, slots=True)
class TaskCompleted:
    node_id: str
    version: str
    outputs: Mapping[str, Any] = field(default_factory=dict)
    poll_after_ms: int = 0
    await_callback: bool = False


@fast_init
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


@fast_init
@dataclass(frozen=True, slots=True)
class PausePipeline:
    """Pause the pipeline, or with `scope` one subprocess node (the root keeps RUNNING)."""

    scope: str = ""


@fast_init
@dataclass(frozen=True, slots=True)
class ResumePipeline:
    scope: str = ""


@fast_init
@dataclass(frozen=True, slots=True)
class RevokePipeline:
    scope: str = ""
    reason: str = "revoked by an operator"


@fast_init
@dataclass(frozen=True, slots=True)
class PauseNode:
    node_id: str


@fast_init
@dataclass(frozen=True, slots=True)
class ResumeNode:
    node_id: str


@fast_init
@dataclass(frozen=True, slots=True)
class RetryNode:
    node_id: str
    # New inputs replace the failed attempt's rendered inputs; None keeps them.
    inputs: Mapping[str, Any] | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class RetrySubprocess:
    node_id: str


@fast_init
@dataclass(frozen=True, slots=True)
class SkipNode:
    node_id: str


@fast_init
@dataclass(frozen=True, slots=True)
class SkipExclusiveGateway:
    node_id: str
    flow_id: str


@fast_init
@dataclass(frozen=True, slots=True)
class SkipConditionalParallelGateway:
    node_id: str
    flow_ids: tuple[str, ...]


@fast_init
@dataclass(frozen=True, slots=True)
class ForceFail:
    node_id: str
    message: str = ""


@fast_init
@dataclass(frozen=True, slots=True)
class Callback:
    node_id: str
    version: str
    data: Any = None


class TimerKind:
    NODE_TIMEOUT = "node_timeout"
    PIPELINE_TIMEOUT = "pipeline_timeout"


@fast_init
@dataclass(frozen=True, slots=True)
class TimerFired:
    kind: str
    node_id: str = ""
    version: str = ""


Event = (
    StartPipeline
    | TaskCompleted
    | TaskFailed
    | PausePipeline
    | ResumePipeline
    | RevokePipeline
    | PauseNode
    | ResumeNode
    | RetryNode
    | RetrySubprocess
    | SkipNode
    | SkipExclusiveGateway
    | SkipConditionalParallelGateway
    | ForceFail
    | Callback
    | TimerFired
)

# ---------------------------------------------------------------- results


class TaskKind:
    EXECUTE = "execute"
    SCHEDULE = "schedule"


@fast_init
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


@fast_init
@dataclass(frozen=True, slots=True)
class CancelTasks:
    """Withdraw the open tasks of a node attempt; a worker holding one learns it through its heartbeat."""

    node_id: str
    version: str
    reason: str


@fast_init
@dataclass(frozen=True, slots=True)
class StartTimer:
    """Deliver `TimerFired(kind, node_id, version)` at `fire_at` (it does nothing if the attempt moved on)."""

    kind: str
    node_id: str
    version: str
    fire_at: int


Command = OfferTask | CancelTasks | StartTimer


@fast_init
@dataclass(frozen=True, slots=True)
class StateChange:
    node_id: str  # "" for the pipeline itself
    old_state: str  # "" when the node had no state
    new_state: str
    version: str
    at: int


@fast_init
@dataclass(frozen=True, slots=True)
class Rejection:
    kind: str  # "failed_precondition" | "not_found" | "invalid_argument"
    message: str


@fast_init
@dataclass(frozen=True, slots=True)
class Decision:
    snapshot: Snapshot
    changed_node_ids: tuple[str, ...] = ()
    histories: tuple[NodeRun, ...] = ()
    commands: tuple[Command, ...] = ()
    changes: tuple[StateChange, ...] = ()
    rejection: Rejection | None = None
    # True when variables, joins or outputs changed (the pipeline's runtime data must be saved).
    runtime_changed: bool = False
    # Nodes whose state is gone (a pause appointment lifted before the path arrived).
    removed_node_ids: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.changed_node_ids or self.changes or self.removed_node_ids or self.runtime_changed)


# ---------------------------------------------------------------- the function


def decide(snapshot: Snapshot, event: Event, now: int) -> Decision:
    step = _Step(snapshot, now)
    handler = getattr(step, _HANDLERS[type(event)])
    handler(event)
    if step.rejection is None:
        step.settle()
    return step.decision()


_HANDLERS: dict[type[Any], str] = {
    StartPipeline: "start",
    TaskCompleted: "task_completed",
    TaskFailed: "task_failed",
    PausePipeline: "pause_pipeline",
    ResumePipeline: "resume_pipeline",
    RevokePipeline: "revoke_pipeline",
    PauseNode: "pause_node",
    ResumeNode: "resume_node",
    RetryNode: "retry_node",
    RetrySubprocess: "retry_subprocess",
    SkipNode: "skip_node",
    SkipExclusiveGateway: "skip_exclusive_gateway",
    SkipConditionalParallelGateway: "skip_conditional_parallel_gateway",
    ForceFail: "force_fail",
    Callback: "callback",
    TimerFired: "timer_fired",
}


RETRYABLE_TYPES = frozenset(
    {
        NodeType.SERVICE_ACTIVITY,
        NodeType.EXECUTABLE_END_EVENT,
        NodeType.EXCLUSIVE_GATEWAY,
        NodeType.CONDITIONAL_PARALLEL_GATEWAY,
    }
)
SKIPPABLE_TYPES = frozenset({NodeType.SERVICE_ACTIVITY, NodeType.EXECUTABLE_END_EVENT, NodeType.SUBPROCESS})
SUBPROCESS_TYPES = frozenset({NodeType.SUBPROCESS})


class VariableError(Exception):
    """A variable could not be rendered; the message names it."""


@fast_init
@dataclass(frozen=True, slots=True)
class _Arrival:
    """A path reaching a node, with its open forks."""

    node_id: str
    forks: tuple[str, ...]


class _Step:
    """The working copy of one decision: reads the snapshot, collects changes and commands."""

    def __init__(self, snapshot: Snapshot, now: int) -> None:
        self.old = snapshot
        self.spec = snapshot.spec
        self.tree = snapshot.spec.tree
        self.now = now
        self.nodes: dict[str, NodeRun] = dict(snapshot.nodes)
        self.state = snapshot.state
        self.version_seq = snapshot.version_seq
        self.finished_at = snapshot.finished_at
        self.contexts: dict[str, Mapping[str, Any]] = dict(snapshot.contexts)
        self.joins: dict[str, Join] = dict(snapshot.joins)
        self.outputs = snapshot.outputs
        self.runtime_changed = False
        self.changed: dict[str, None] = {}
        self.histories: list[NodeRun] = []
        self.commands: list[Command] = []
        self.changes: list[StateChange] = []
        self.rejection: Rejection | None = None
        self.failed_count = snapshot.failed_count
        self.parked: list[tuple[str, tuple[str, ...]]] = list(snapshot.parked)
        self.callbacks: dict[str, tuple[Any, ...]] = dict(snapshot.callbacks)
        self.failure_handler = snapshot.failure_handler
        self.removed: set[str] = set()
        self._rendering: list[tuple[str, str]] = []

    # ------------------------------------------------------------ bookkeeping

    def decision(self) -> Decision:
        if self.rejection is not None:
            return Decision(self.old, rejection=self.rejection)
        snapshot = evolve(
            self.old,
            state=self.state,
            nodes=self.nodes,
            version_seq=self.version_seq,
            finished_at=self.finished_at,
            contexts=self.contexts,
            joins=self.joins,
            outputs=self.outputs,
            failed_count=self.failed_count,
            parked=tuple(self.parked),
            callbacks=self.callbacks,
            failure_handler=self.failure_handler,
        )
        return Decision(
            snapshot,
            tuple(self.changed),
            tuple(self.histories),
            tuple(self.commands),
            tuple(self.changes),
            runtime_changed=self.runtime_changed,
            removed_node_ids=tuple(sorted(self.removed)),
        )

    def reject(self, kind: str, message: str) -> None:
        self.rejection = Rejection(kind, message)

    def new_version(self) -> str:
        self.version_seq += 1
        return f"v{self.version_seq}"

    def blocks(self, run: NodeRun | None) -> bool:
        """A node that stops its level from finishing: FAILED, or a REVOKED subprocess."""
        if run is None:
            return False
        return run.state is NodeState.FAILED or (run.state is NodeState.REVOKED and run.node_id in self.tree.scopes)

    def put(self, run: NodeRun) -> None:
        old = self.nodes.get(run.node_id)
        self.failed_count += self.blocks(run) - self.blocks(old)
        old_state = old.state.value if old is not None else ""
        if old is not None and old.version != run.version:
            old = None  # a new attempt: its predecessor went to history
        unchanged = old is not None and old.state is run.state  # an update of the same attempt's data
        if not unchanged and not can_transition(old.state if old is not None else None, run.state):
            raise AssertionError(f"node {run.node_id}: {old_state} -> {run.state.value} is not a transition")
        if old is None or old.state is not run.state:
            self.changes.append(StateChange(run.node_id, old_state, run.state.value, run.version, self.now))
        self.nodes[run.node_id] = run
        self.changed[run.node_id] = None
        self.removed.discard(run.node_id)

    def remove(self, node_id: str) -> None:
        run = self.nodes.pop(node_id)
        self.failed_count -= self.blocks(run)
        self.changed.pop(node_id, None)
        self.removed.add(node_id)
        self.changes.append(StateChange(node_id, run.state.value, "", run.version, self.now))

    def set_pipeline_state(self, state: PipelineState) -> None:
        if state is self.state:
            return
        if not can_transition_pipeline(self.state, state):
            raise AssertionError(f"pipeline: {self.state.value} -> {state.value} is not a transition")
        self.changes.append(StateChange("", self.state.value, state.value, "", self.now))
        self.state = state
        if state is PipelineState.FAILED:
            self.run_failure_handler()
        self.finished_at = (
            self.now if state in (PipelineState.FINISHED, PipelineState.REVOKED, PipelineState.FAILED) else 0
        )

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
                "failed_precondition", f"node {node_id!r} is {run.state.value}, so it cannot take a task result"
            )
            return None
        if self.state is not PipelineState.RUNNING and self.state is not PipelineState.SUSPENDED:
            self.reject(
                "failed_precondition",
                f"pipeline {self.old.pipeline_id!r} is {self.state.value}, so it takes no more task results",
            )
            return None
        return run

    # ------------------------------------------------------------ variables

    def set_variable(self, scope: str, key: str, value: Any) -> None:
        self.contexts[scope] = {**self.contexts.get(scope, {}), key: value}
        self.runtime_changed = True

    def lookup(self, scope: str, key: str) -> Any:
        """The value of variable `key` ("${name}") at a pipeline level; splice variables render on use."""
        context = self.contexts.get(scope, {})
        if key in context:
            return context[key]
        var = self.tree.scopes[scope].inputs.get(key)
        if var is not None and var.type == "splice" and not var.sources:
            if (scope, key) in self._rendering:
                chain = " -> ".join(k for _, k in [*self._rendering, (scope, key)])
                raise VariableError(f"variables refer to each other in a circle: {chain}")
            self._rendering.append((scope, key))
            try:
                return self.render(scope, var.value)
            finally:
                self._rendering.pop()
        if key in self.old.presets:
            return self.old.presets[key]
        raise KeyError(key)

    def render(self, scope: str, value: Any) -> Any:
        """Renders every ${...} in a value (strings inside lists and dicts too) against a level's variables."""
        if isinstance(value, str):
            if "${" not in value:
                return value
            return cached_splice(value).render(lambda name: self.lookup(scope, f"${{{name}}}"))
        if isinstance(value, list):
            return [self.render(scope, item) for item in value]
        if isinstance(value, dict):
            return {key: self.render(scope, item) for key, item in value.items()}
        return value

    def render_var(self, scope: str, var: VarSpec) -> Any:
        if var.type == "plain":
            return var.value
        value = self.render(scope, var.value)
        return resolve_lazy(var.custom_type, value) if var.type == "lazy" else value

    def enter_scope(self, scope: str, overrides: Mapping[str, Any]) -> None:
        """Sets up a pipeline level's variables as it starts: plain values and defaults now, overrides on top,
        then lazy and pre-rendered ones; other splices render on use."""
        spec = self.tree.scopes[scope]
        values: dict[str, Any] = {}
        for key, var in spec.inputs.items():
            if var.sources or var.type == "plain":
                values[key] = var.value
        values.update(overrides)
        self.contexts[scope] = values
        self.runtime_changed = True
        for key, var in spec.inputs.items():
            if key in overrides or var.sources:
                continue
            if var.type == "lazy" or (var.type == "splice" and key in spec.pre_render_keys):
                self.set_variable(scope, key, self.render_var(scope, var))

    def write_outputs(self, node_id: str, outputs: Mapping[str, Any]) -> None:
        """Copies a node's outputs into the variables that reference them (node-output variables)."""
        for scope, key, source_key in self.tree.output_refs.get(node_id, ()):
            for candidate in (source_key, f"${{{source_key}}}", source_key.removeprefix("${").removesuffix("}")):
                if candidate in outputs:
                    self.set_variable(scope, key, outputs[candidate])
                    break

    # ------------------------------------------------------------ events

    def start(self, event: StartPipeline) -> None:
        if self.nodes:
            self.reject("failed_precondition", f"pipeline {self.old.pipeline_id!r} has already started")
            return
        first = event.start_node_id or self.spec.start_event_id
        if first not in self.spec.nodes:
            self.reject("invalid_argument", f"start node {first!r} is not a node of the root pipeline")
            return
        self.set_pipeline_state(PipelineState.RUNNING)
        try:
            self.enter_scope("", self.old.presets)
        except (ExpressionError, VariableError, LazyError, KeyError) as exc:
            self.reject("invalid_argument", f"cannot set up the pipeline's variables: {_describe(exc)}")
            return
        if event.timeout_ms > 0:
            self.commands.append(StartTimer(TimerKind.PIPELINE_TIMEOUT, "", "", self.now + event.timeout_ms))
        if event.failure_handler:
            self.failure_handler = FailureHandler(event.failure_handler)
            self.runtime_changed = True
        self.walk([_Arrival(first, ())])

    def task_completed(self, event: TaskCompleted) -> None:
        if event.node_id == FAILURE_HANDLER_NODE:
            self.failure_handled(event.version, "FINISHED", {**event.outputs, "_result": True})
            return
        run = self.current_attempt(event.node_id, event.version)
        if run is None:
            return
        outputs = {**run.outputs, **event.outputs}
        if event.poll_after_ms > 0:
            run = evolve(run, outputs=outputs, schedule_times=run.schedule_times + 1, awaiting_callback=False)
            self.put(run)
            self.offer(run, TaskKind.SCHEDULE, available_at=self.now + event.poll_after_ms)
            return
        if event.await_callback:
            queued = self.callbacks.get(run.node_id, ())
            if queued:  # a callback arrived while the worker handled the previous one
                self.set_callbacks(run.node_id, queued[1:])
                self.deliver_callback(evolve(run, outputs=outputs), queued[0])
            else:
                self.forget_callbacks(run.node_id)
                self.put(evolve(run, outputs=outputs, awaiting_callback=True))
            return
        self.forget_callbacks(run.node_id)
        outputs["_result"] = True
        done = evolve(run, state=NodeState.FINISHED, outputs=outputs, finished_at=self.now, awaiting_callback=False)
        self.put(done)
        self.write_outputs(run.node_id, outputs)
        self.move_on(done)

    def task_failed(self, event: TaskFailed) -> None:
        if event.node_id == FAILURE_HANDLER_NODE:
            self.failure_handled(event.version, "FAILED", {**event.outputs, "_result": False, "ex_data": event.message})
            return
        run = self.current_attempt(event.node_id, event.version)
        if run is None:
            return
        node = self.tree.nodes[run.node_id]
        self.forget_callbacks(run.node_id)
        outputs = {**run.outputs, **event.outputs, "_result": False, "ex_data": event.message}
        failed = evolve(run, state=NodeState.FAILED, outputs=outputs, finished_at=self.now, awaiting_callback=False)
        retry_budget = node.auto_retry_times or (event.transient_retry_budget if event.retryable else 0)
        if run.retry < retry_budget:
            delay = max(event.retry_after_ms, node.auto_retry_interval_ms)
            self.retry(failed, available_at=self.now + delay)
            return
        self.write_outputs(run.node_id, outputs)
        if node.error_ignorable:
            ignored = evolve(failed, state=NodeState.FINISHED, error_ignored=True)
            self.put(ignored)
            self.move_on(ignored)
            return
        self.put(failed)

    # ------------------------------------------------------------ movement

    def retry(self, failed: NodeRun, *, available_at: int) -> None:
        """The failed attempt goes to history; a new attempt with the same inputs runs."""
        self.histories.append(failed)
        self.put(failed)  # records the FAILED step for watchers
        attempt = evolve(
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

    def move_on(self, done: NodeRun) -> None:
        """A node finished: an end event closes its level, anything else passes the path on."""
        node = self.tree.nodes[done.node_id]
        if node.type in END_EVENTS:
            self.level_finished(node)
        else:
            self.walk([_Arrival(target, done.forks) for target in self.next_targets(node.id)])

    def next_targets(self, node_id: str) -> list[str]:
        return [self.tree.flows[flow_id].target for flow_id in self.tree.nodes[node_id].outgoing]

    def walk(self, arrivals: list[_Arrival]) -> None:
        """Moves paths forward through the nodes the engine runs itself, until each waits on a task."""
        pending = deque(arrivals)
        while pending:
            arrival = pending.popleft()
            node = self.tree.nodes[arrival.node_id]
            if self.blocked(node.id):
                self.parked.append((node.id, arrival.forks))
                self.runtime_changed = True
                continue
            if node.type is NodeType.CONVERGE_GATEWAY:
                forks = self.arrive_at_converge(node, arrival.forks)
                if forks is None:
                    continue  # waiting for the other branches
                run = self.enter(node, forks, NodeState.FINISHED)
                if run is not None:
                    pending.extend(_Arrival(t, forks) for t in self.next_targets(node.id))
                continue
            if node.type in TASK_NODES:
                self.enter_task_node(node, arrival.forks)
            elif node.type is NodeType.SUBPROCESS:
                pending.extend(self.enter_subprocess(node, arrival.forks))
            elif node.type is NodeType.EMPTY_END_EVENT:
                if self.enter(node, arrival.forks, NodeState.FINISHED) is not None:
                    self.level_finished(node)
            elif node.type is NodeType.EMPTY_START_EVENT or node.type is NodeType.PARALLEL_GATEWAY:
                run = self.enter(node, arrival.forks, NodeState.FINISHED)
                if run is None:
                    continue
                targets = self.next_targets(node.id)
                if node.type is NodeType.PARALLEL_GATEWAY:
                    self.open_join(node.id, len(targets))
                    pending.extend(_Arrival(t, (*arrival.forks, node.id)) for t in targets)
                else:
                    pending.extend(_Arrival(t, arrival.forks) for t in targets)
            else:
                pending.extend(self.choose_branches(node, arrival.forks))

    def enter(self, node: NodeSpec, forks: tuple[str, ...], state: NodeState) -> NodeRun | None:
        """Creates the node's next attempt; an earlier one (a loop) goes to history. None past the rerun limit."""
        scope = self.tree.scope_of[node.id]
        entry = self.nodes[scope].version if scope else ""
        old = self.nodes.get(node.id)
        loop = inner_loop = 1
        if old is not None and _is_appointment(old):
            old = None  # a lifted pause appointment is not an earlier attempt
        if old is not None:
            self.forget_callbacks(node.id)
            if old.state in ACTIVE_NODE_STATES and node.type in TASK_NODES:
                self.commands.append(CancelTasks(old.node_id, old.version, "the node was entered again"))
            self.histories.append(old)
            loop = old.loop + 1
            inner_loop = old.inner_loop + 1 if old.scope_entry == entry else 1
        done = state is NodeState.FINISHED
        run = NodeRun(
            node_id=node.id,
            state=state,
            version=self.new_version(),
            loop=loop,
            inner_loop=inner_loop,
            started_at=self.now,
            finished_at=self.now if done else 0,
            outputs={"_result": True} if done else {},
            forks=forks,
            scope_entry=entry,
        )
        if loop > self.old.rerun_limit:
            self.fail(
                evolve(run, state=NodeState.RUNNING, finished_at=0, outputs={}),
                f"node {node.id!r} was entered {loop} times, over the rerun limit of {self.old.rerun_limit}",
            )
            return None
        self.put(run)
        return run

    def fail(self, run: NodeRun, message: str) -> None:
        self.put(
            evolve(
                run,
                state=NodeState.FAILED,
                finished_at=self.now,
                outputs={**run.outputs, "_result": False, "ex_data": message},
            )
        )

    def enter_task_node(self, node: NodeSpec, forks: tuple[str, ...]) -> None:
        run = self.enter(node, forks, NodeState.RUNNING)
        if run is None:
            return
        scope = self.tree.scope_of[node.id]
        try:
            inputs = {key: self.render_var(scope, var) for key, var in node.inputs.items()}
        except (ExpressionError, VariableError, LazyError, KeyError) as exc:
            self.fail(run, f"cannot render the inputs of {node.id!r}: {_describe(exc)}")
            return
        inputs["_loop"] = run.loop
        inputs["_inner_loop"] = run.inner_loop
        run = evolve(run, inputs=inputs)
        self.put(run)
        self.offer(run, TaskKind.EXECUTE, available_at=self.now)

    def enter_subprocess(self, node: NodeSpec, forks: tuple[str, ...]) -> list[_Arrival]:
        run = self.enter(node, forks, NodeState.RUNNING)
        if run is None:
            return []
        return self.start_subprocess(node, run)

    def start_subprocess(self, node: NodeSpec, run: NodeRun) -> list[_Arrival]:
        """Renders the params in the parent, sets up the child level, and sends a path to its start event."""
        parent = self.tree.scope_of[node.id]
        child = node.subprocess
        assert child is not None
        try:
            params = {key: self.render_var(parent, var) for key, var in node.params.items()}
            self.put(evolve(run, inputs=params))
            self.enter_scope(node.id, params)
        except (ExpressionError, VariableError, LazyError, KeyError) as exc:
            self.fail(self.nodes[node.id], f"cannot render the params of subprocess {node.id!r}: {_describe(exc)}")
            return []
        return [_Arrival(child.start_event_id, ())]

    def level_finished(self, end: NodeSpec) -> None:
        """An end event finished: its subprocess finishes (the parent path moves on), or the pipeline does."""
        scope = self.tree.scope_of[end.id]
        spec = self.tree.scopes[scope]
        try:
            outputs = {key: self.lookup(scope, key) for key in spec.outputs}
        except (ExpressionError, VariableError, LazyError, KeyError) as exc:
            message = f"cannot render the outputs of {_level(scope)}: {_describe(exc)}"
            if not scope:
                self.fail(self.nodes[end.id], message)
            else:
                self.fail(self.nodes[scope], message)
            return
        if not scope:
            self.outputs = outputs
            self.runtime_changed = True
            self.set_pipeline_state(PipelineState.FINISHED)
            return
        subprocess_run = self.nodes[scope]
        done = evolve(
            subprocess_run,
            state=NodeState.FINISHED,
            outputs={**outputs, "_result": True},
            finished_at=self.now,
        )
        self.put(done)
        self.write_outputs(scope, done.outputs)
        self.walk([_Arrival(t, done.forks) for t in self.next_targets(scope)])

    # ------------------------------------------------------------ gateways

    def open_join(self, fork_id: str, expected: int) -> None:
        self.joins[fork_id] = Join(expected)
        self.runtime_changed = True

    def arrive_at_converge(self, node: NodeSpec, forks: tuple[str, ...]) -> tuple[str, ...] | None:
        """Counts an arrival at the converge of the path's innermost fork; the path's forks once all arrived."""
        if not forks or self.tree.converge_of.get(forks[-1]) != node.id:
            return forks  # merges exclusive branches: every arrival passes
        fork = forks[-1]
        join = self.joins.get(fork, Join(1))
        arrived = join.arrived + 1
        self.runtime_changed = True
        if arrived < join.expected:
            self.joins[fork] = Join(join.expected, arrived)
            return None
        self.joins.pop(fork, None)
        return forks[:-1]

    def choose_branches(self, node: NodeSpec, forks: tuple[str, ...], run: NodeRun | None = None) -> list[_Arrival]:
        """Exclusive and conditional parallel gateways: evaluate conditions and pick the flows to take."""
        run = run or self.enter(node, forks, NodeState.RUNNING)
        if run is None:
            return []
        scope = self.tree.scope_of[node.id]
        taken: list[str] = []
        for flow_id in node.outgoing:
            text = node.conditions.get(flow_id)
            if text is None:
                continue
            try:
                if cached_condition(text).evaluate(lambda name: self.lookup(scope, f"${{{name}}}")):
                    taken.append(flow_id)
            except (ExpressionError, VariableError, LazyError, KeyError) as exc:
                self.fail(run, f"the condition of flow {flow_id!r} ({text!r}) cannot be evaluated: {_describe(exc)}")
                return []
        if not taken and node.default_flow:
            taken = [node.default_flow]
        if not taken:
            self.fail(run, "all conditions of branches are not meet")
            return []
        if node.type is NodeType.EXCLUSIVE_GATEWAY:
            if len(taken) > 1:
                self.fail(
                    run,
                    f"exclusive gateway {node.id!r} met more than one condition (flows {', '.join(taken)}); "
                    "exactly one must hold",
                )
                return []
            self.put(evolve(run, state=NodeState.FINISHED, finished_at=self.now, outputs={"_result": True}))
            return [_Arrival(self.tree.flows[taken[0]].target, forks)]
        self.put(evolve(run, state=NodeState.FINISHED, finished_at=self.now, outputs={"_result": True}))
        self.open_join(node.id, len(taken))
        return [_Arrival(self.tree.flows[flow_id].target, (*forks, node.id)) for flow_id in taken]

    # ------------------------------------------------------------ tasks and failure

    def offer(self, run: NodeRun, kind: str, *, available_at: int, callback_data: Any = None) -> None:
        node = self.tree.nodes[run.node_id]
        if kind == TaskKind.EXECUTE and node.timeout_ms > 0:
            self.commands.append(
                StartTimer(TimerKind.NODE_TIMEOUT, run.node_id, run.version, available_at + node.timeout_ms)
            )
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

    def settle(self) -> None:
        """A level fails once one of its nodes failed and none of its nodes can still make progress.

        A failed subprocess is a failed node of its parent, so failure climbs until a level still has work.
        """
        if self.failed_count <= 0 or self.state is not PipelineState.RUNNING:
            return
        while True:
            failed: set[str] = set()
            active: set[str] = set()
            for node_id, run in self.nodes.items():
                scope = self.tree.scope_of[node_id]
                if self.blocks(run):
                    failed.add(scope)
                elif run.state in ACTIVE_NODE_STATES or (
                    # a paused subprocess may still have tasks running inside it
                    run.state is NodeState.SUSPENDED and node_id in self.tree.scopes and not _is_appointment(run)
                ):
                    active.add(scope)
            stuck = [scope for scope in failed if scope not in active and self._level_running(scope)]
            if not stuck:
                return
            for scope in stuck:
                if not scope:
                    self.set_pipeline_state(PipelineState.FAILED)
                    return
                failed_children = sorted(
                    node_id
                    for node_id, run in self.nodes.items()
                    if run.state is NodeState.FAILED and self.tree.scope_of[node_id] == scope
                )
                self.fail(self.nodes[scope], f"subprocess failed: node {', '.join(failed_children)} failed")

    def _level_running(self, scope: str) -> bool:
        if not scope:
            return self.state is PipelineState.RUNNING
        return self.nodes[scope].state is NodeState.RUNNING

    # ------------------------------------------------------------ the failure handler

    def run_failure_handler(self) -> None:
        """The first time the pipeline fails, its failure handler component gets one task."""
        handler = self.failure_handler
        if handler is None or handler.state:
            return
        failed = [
            {"node_id": node_id, "ex_data": run.outputs.get("ex_data", "")}
            for node_id, run in self.nodes.items()
            if run.state is NodeState.FAILED
        ]
        self.failure_handler = evolve(handler, state="RUNNING")
        self.runtime_changed = True
        self.commands.append(
            OfferTask(
                node_id=FAILURE_HANDLER_NODE,
                version=FAILURE_HANDLER_VERSION,
                kind=TaskKind.EXECUTE,
                component_code=handler.code,
                component_version="legacy",
                inputs={"pipeline_id": self.old.pipeline_id, "failed_nodes": failed},
                outputs={},
                loop=1,
                inner_loop=1,
                retry=0,
                schedule_times=0,
                available_at=self.now,
            )
        )

    def failure_handled(self, version: str, state: str, outputs: Mapping[str, Any]) -> None:
        handler = self.failure_handler
        if handler is None or handler.state != "RUNNING" or version != FAILURE_HANDLER_VERSION:
            self.reject("failed_precondition", "the pipeline's failure handler is not running")
            return
        self.failure_handler = evolve(handler, state=state, outputs=outputs)
        self.runtime_changed = True

    # ------------------------------------------------------------ control operations

    def set_callbacks(self, node_id: str, queued: tuple[Any, ...]) -> None:
        """Marks a callback as being handled by the node's worker, with those that wait behind it."""
        self.callbacks[node_id] = queued
        self.runtime_changed = True

    def forget_callbacks(self, node_id: str) -> None:
        if self.callbacks.pop(node_id, None) is not None:
            self.runtime_changed = True

    def blocked(self, node_id: str) -> bool:
        """A path stops here: the pipeline or an enclosing subprocess is paused, or the node is appointed to."""
        if self.state is PipelineState.SUSPENDED:
            return True
        run = self.nodes.get(node_id)
        if run is not None and _is_appointment(run):
            return True
        scope = self.tree.scope_of[node_id]
        while scope:
            if self.nodes[scope].state is NodeState.SUSPENDED:
                return True
            scope = self.tree.scope_of[scope]
        return False

    def unpark(self) -> None:
        """Walks every stopped path again; those still blocked stop again."""
        parked, self.parked = self.parked, []
        self.runtime_changed = True
        self.walk([_Arrival(node_id, forks) for node_id, forks in parked])

    def open_pipeline(self, operation: str) -> bool:
        if self.state in (PipelineState.FINISHED, PipelineState.REVOKED):
            self.reject(
                "failed_precondition",
                f"pipeline {self.old.pipeline_id!r} is {self.state.value}, so it cannot be {operation}",
            )
            return False
        return True

    def node_spec(self, node_id: str) -> NodeSpec | None:
        node = self.tree.nodes.get(node_id)
        if node is None:
            self.reject("not_found", f"pipeline {self.old.pipeline_id!r} has no node {node_id!r}")
        return node

    def node_in_state(
        self,
        node_id: str,
        operation: str,
        *states: NodeState,
        types: frozenset[NodeType] | None = None,
        hint: str = "",
    ) -> NodeRun | None:
        """The node's run if it has a type in `types` and is in one of `states`; otherwise rejects saying why.

        The type is checked first, so a request that can never apply to the node gets the same answer in
        every state.
        """
        node = self.node_spec(node_id)
        if node is None:
            return None
        if types is not None and node.type not in types:
            kinds = ", ".join(sorted(t.value for t in types))
            self.reject(
                "invalid_argument",
                f"node {node_id!r} is a {node.type.value}; only a {kinds} can be {operation}{hint}",
            )
            return None
        run = self.nodes.get(node_id)
        if run is None or _is_appointment(run) or run.state not in states:
            now = "has not been reached" if run is None or _is_appointment(run) else f"is {run.state.value}"
            wanted = " or ".join(state.value for state in states)
            self.reject("failed_precondition", f"node {node_id!r} {now}; only a {wanted} node can be {operation}")
            return None
        return run

    def subprocess_run(self, scope: str, operation: str) -> NodeRun | None:
        node = self.node_spec(scope)
        if node is None:
            return None
        if node.type is not NodeType.SUBPROCESS:
            self.reject("invalid_argument", f"node {scope!r} is a {node.type.value}, not a SubProcess")
            return None
        run = self.nodes.get(scope)
        if run is None or _is_appointment(run):
            self.reject(
                "failed_precondition", f"subprocess {scope!r} has not been reached, so it cannot be {operation}"
            )
            return None
        return run

    def reopen_levels(self, node_id: str) -> None:
        """A failed node runs again: the subprocesses around it and the pipeline are no longer FAILED."""
        scope = self.tree.scope_of[node_id]
        while scope:
            run = self.nodes[scope]
            if run.state is NodeState.FAILED:
                outputs = {k: v for k, v in run.outputs.items() if k not in ("ex_data", "_result")}
                self.put(evolve(run, state=NodeState.RUNNING, finished_at=0, outputs=outputs))
            scope = self.tree.scope_of[scope]
        if self.state is PipelineState.FAILED:
            self.set_pipeline_state(PipelineState.RUNNING)

    def pause_pipeline(self, event: PausePipeline) -> None:
        if not self.open_pipeline("paused"):
            return
        if event.scope:
            run = self.subprocess_run(event.scope, "paused")
            if run is None or run.state is NodeState.SUSPENDED:
                return
            if run.state is not NodeState.RUNNING:
                self.reject(
                    "failed_precondition",
                    f"subprocess {event.scope!r} is {run.state.value}; only a RUNNING one can be paused",
                )
                return
            self.put(evolve(run, state=NodeState.SUSPENDED))
            return
        if self.state is PipelineState.FAILED:
            self.reject(
                "failed_precondition",
                f"pipeline {self.old.pipeline_id!r} is FAILED; retry or skip the failed node first",
            )
            return
        self.set_pipeline_state(PipelineState.SUSPENDED)

    def resume_pipeline(self, event: ResumePipeline) -> None:
        if not self.open_pipeline("resumed"):
            return
        if event.scope:
            run = self.subprocess_run(event.scope, "resumed")
            if run is None or run.state is NodeState.RUNNING:
                return
            if run.state is not NodeState.SUSPENDED:
                self.reject(
                    "failed_precondition",
                    f"subprocess {event.scope!r} is {run.state.value}; only a SUSPENDED one can be resumed",
                )
                return
            self.put(evolve(run, state=NodeState.RUNNING))
        elif self.state is PipelineState.SUSPENDED:
            self.set_pipeline_state(PipelineState.RUNNING)
        elif self.state is PipelineState.RUNNING:
            return
        else:
            self.reject(
                "failed_precondition",
                f"pipeline {self.old.pipeline_id!r} is {self.state.value}; only a SUSPENDED pipeline can be resumed",
            )
            return
        self.unpark()

    def revoke_pipeline(self, event: RevokePipeline) -> None:
        if self.state is PipelineState.REVOKED:
            return
        if not self.open_pipeline("revoked"):
            return
        if event.scope:
            run = self.subprocess_run(event.scope, "revoked")
            if run is None or run.state is NodeState.REVOKED:
                return
            if run.state is NodeState.FINISHED:
                self.reject("failed_precondition", f"subprocess {event.scope!r} is FINISHED, so it cannot be revoked")
                return
            self.revoke_nodes(lambda node_id: self.inside(node_id, event.scope), event.reason)
            self.put(evolve(self.nodes[event.scope], state=NodeState.REVOKED, finished_at=self.now))
            return
        self.revoke_nodes(lambda node_id: True, event.reason)
        self.set_pipeline_state(PipelineState.REVOKED)

    def inside(self, node_id: str, scope: str) -> bool:
        level = self.tree.scope_of[node_id]
        while level:
            if level == scope:
                return True
            level = self.tree.scope_of[level]
        return False

    def revoke_nodes(self, selected: Any, reason: str) -> None:
        """Unfinished nodes become REVOKED; their open tasks are withdrawn; stopped paths are dropped."""
        for node_id, run in list(self.nodes.items()):
            open_states = (NodeState.RUNNING, NodeState.READY, NodeState.SUSPENDED, NodeState.FAILED)
            if not selected(node_id) or run.state not in open_states:
                continue
            if _is_appointment(run):
                self.remove(node_id)
                continue
            if self.tree.nodes[node_id].type in TASK_NODES and run.state is NodeState.RUNNING:
                self.commands.append(CancelTasks(node_id, run.version, reason))
            self.put(evolve(run, state=NodeState.REVOKED, finished_at=self.now, awaiting_callback=False))
            self.forget_callbacks(node_id)
        kept = [(node_id, forks) for node_id, forks in self.parked if not selected(node_id)]
        if len(kept) != len(self.parked):
            self.parked = kept
            self.runtime_changed = True

    def pause_node(self, event: PauseNode) -> None:
        node = self.node_spec(event.node_id)
        if node is None or not self.open_pipeline("changed"):
            return
        run = self.nodes.get(node.id)
        if run is not None and _is_appointment(run):
            return
        if run is not None:
            self.reject(
                "failed_precondition",
                f"node {node.id!r} is {run.state.value}; only a node the pipeline has not reached can be "
                "appointed to pause (pause the pipeline to stop running work)",
            )
            return
        if node.type is NodeType.EMPTY_START_EVENT:
            self.reject("invalid_argument", f"node {node.id!r} is the start event; it cannot be paused")
            return
        self.put(NodeRun(node_id=node.id, state=NodeState.SUSPENDED, version=self.new_version()))

    def resume_node(self, event: ResumeNode) -> None:
        node = self.node_spec(event.node_id)
        if node is None or not self.open_pipeline("changed"):
            return
        run = self.nodes.get(node.id)
        if run is None or run.state is NodeState.RUNNING:
            return  # not paused (any more): nothing to resume
        if not _is_appointment(run):
            hint = " (resume a paused subprocess with ResumePipeline and its id)" if node.id in self.tree.scopes else ""
            self.reject(
                "failed_precondition",
                f"node {node.id!r} is {run.state.value}, not appointed to pause, so there is nothing to resume{hint}",
            )
            return
        self.remove(node.id)
        waiting = [(node_id, forks) for node_id, forks in self.parked if node_id == node.id]
        if waiting:
            self.parked = [(node_id, forks) for node_id, forks in self.parked if node_id != node.id]
            self.walk([_Arrival(node_id, forks) for node_id, forks in waiting])
        self.runtime_changed = True

    def reattempt(self, old: NodeRun, state: NodeState) -> NodeRun:
        """A new attempt of a node in the same loop (retry): the old one goes to history."""
        self.histories.append(old)
        return evolve(
            old,
            state=state,
            version=self.new_version(),
            retry=old.retry + 1,
            skip=False,
            error_ignored=False,
            outputs={},
            schedule_times=0,
            awaiting_callback=False,
            started_at=self.now,
            finished_at=0,
        )

    def retry_node(self, event: RetryNode) -> None:
        run = self.node_in_state(
            event.node_id,
            "retried",
            NodeState.FAILED,
            types=RETRYABLE_TYPES,
            hint=" (use RetrySubprocess for a subprocess)",
        )
        if run is None or not self.open_pipeline("changed"):
            return
        node = self.tree.nodes[run.node_id]
        if not node.retryable:
            self.reject("failed_precondition", f"node {node.id!r} is not retryable (retryable: false in the tree)")
            return
        self.reopen_levels(node.id)
        self.forget_callbacks(node.id)
        if node.type in TASK_NODES:
            inputs = dict(run.inputs) if event.inputs is None else {**event.inputs}
            inputs.update(_loop=run.loop, _inner_loop=run.inner_loop)
            attempt = evolve(self.reattempt(run, NodeState.RUNNING), inputs=inputs)
            self.put(attempt)
            self.offer(attempt, TaskKind.EXECUTE, available_at=self.now)
            return
        attempt = self.reattempt(run, NodeState.RUNNING)
        self.put(attempt)
        self.walk_from_gateway(node, attempt)

    def walk_from_gateway(self, node: NodeSpec, run: NodeRun) -> None:
        if node.type in (NodeType.EXCLUSIVE_GATEWAY, NodeType.CONDITIONAL_PARALLEL_GATEWAY):
            self.walk(self.choose_branches(node, run.forks, run))
        else:  # any other node the engine evaluates: finish it again and move on
            done = evolve(run, state=NodeState.FINISHED, finished_at=self.now, outputs={"_result": True})
            self.put(done)
            self.move_on(done)

    def retry_subprocess(self, event: RetrySubprocess) -> None:
        run = self.node_in_state(
            event.node_id, "retried with RetrySubprocess", NodeState.FAILED, types=SUBPROCESS_TYPES
        )
        if run is None or not self.open_pipeline("changed"):
            return
        node = self.tree.nodes[run.node_id]
        self.reopen_levels(node.id)
        attempt = self.reattempt(run, NodeState.RUNNING)
        self.put(attempt)
        self.walk(self.start_subprocess(node, attempt))

    def skip_node(self, event: SkipNode) -> None:
        run = self.node_in_state(
            event.node_id, "skipped", NodeState.FAILED, types=SKIPPABLE_TYPES, hint=" (skip a gateway naming its flows)"
        )
        if run is None or not self.open_pipeline("changed"):
            return
        node = self.tree.nodes[run.node_id]
        if not node.skippable:
            self.reject("failed_precondition", f"node {node.id!r} is not skippable (skippable: false in the tree)")
            return
        self.reopen_levels(node.id)
        self.forget_callbacks(node.id)
        done = evolve(run, state=NodeState.FINISHED, skip=True, finished_at=self.now)
        self.put(done)  # a skipped node's outputs are not copied to the variables
        self.move_on(done)

    def skip_gateway(self, node_id: str, flow_ids: tuple[str, ...], kind: NodeType) -> NodeRun | None:
        run = self.node_in_state(node_id, "skipped this way", NodeState.FAILED, types=frozenset({kind}))
        if run is None or not self.open_pipeline("changed"):
            return None
        node = self.tree.nodes[node_id]
        unknown = [flow_id for flow_id in flow_ids if flow_id not in node.outgoing]
        if unknown or not flow_ids:
            self.reject(
                "invalid_argument",
                f"gateway {node_id!r}: name outgoing flows to take ({', '.join(node.outgoing)}); "
                f"not {', '.join(unknown) or 'none'}",
            )
            return None
        self.reopen_levels(node_id)
        done = evolve(run, state=NodeState.FINISHED, skip=True, finished_at=self.now)
        self.put(done)
        return done

    def skip_exclusive_gateway(self, event: SkipExclusiveGateway) -> None:
        done = self.skip_gateway(event.node_id, (event.flow_id,), NodeType.EXCLUSIVE_GATEWAY)
        if done is not None:
            self.walk([_Arrival(self.tree.flows[event.flow_id].target, done.forks)])

    def skip_conditional_parallel_gateway(self, event: SkipConditionalParallelGateway) -> None:
        flows = tuple(dict.fromkeys(event.flow_ids))
        done = self.skip_gateway(event.node_id, flows, NodeType.CONDITIONAL_PARALLEL_GATEWAY)
        if done is not None:
            self.open_join(done.node_id, len(flows))
            self.walk([_Arrival(self.tree.flows[f].target, (*done.forks, done.node_id)) for f in flows])

    def force_fail(self, event: ForceFail) -> None:
        run = self.node_in_state(event.node_id, "force-failed", NodeState.RUNNING, types=TASK_NODES)
        if run is None or not self.open_pipeline("changed"):
            return
        message = event.message or "forced to fail by an operator"
        self.stop_attempt(run, message, skip=False)

    def stop_attempt(self, run: NodeRun, message: str, *, skip: bool) -> None:
        """Ends a running task node from outside (force-fail, time-out); its worker is told to cancel."""
        self.commands.append(CancelTasks(run.node_id, run.version, message))
        self.forget_callbacks(run.node_id)
        outputs = {**run.outputs, "_result": False, "ex_data": message, "_forced_failed": True}
        failed = evolve(run, state=NodeState.FAILED, outputs=outputs, finished_at=self.now, awaiting_callback=False)
        self.put(failed)
        if skip:
            done = evolve(failed, state=NodeState.FINISHED, skip=True)
            self.put(done)
            self.move_on(done)

    def callback(self, event: Callback) -> None:
        run = self.node_in_state(event.node_id, "called back", NodeState.RUNNING, types=TASK_NODES)
        if run is None or not self.open_pipeline("called back"):
            return
        if run.version != event.version:
            self.reject(
                "failed_precondition",
                f"node {run.node_id!r} is at version {run.version}, not {event.version}: the callback is for an "
                "older attempt",
            )
            return
        if run.awaiting_callback:
            self.deliver_callback(run, event.data)
        elif run.node_id in self.callbacks:
            # The worker is still handling an earlier callback: this one waits its turn.
            self.set_callbacks(run.node_id, (*self.callbacks[run.node_id], event.data))
        else:
            self.reject("failed_precondition", f"node {run.node_id!r} is not waiting for a callback")

    def deliver_callback(self, run: NodeRun, data: Any) -> None:
        """Offers callback data to the worker as a schedule task; until it answers, more callbacks queue."""
        attempt = evolve(run, awaiting_callback=False, schedule_times=run.schedule_times + 1)
        self.set_callbacks(run.node_id, self.callbacks.get(run.node_id, ()))
        self.put(attempt)
        self.offer(attempt, TaskKind.SCHEDULE, available_at=self.now, callback_data=data)

    def timer_fired(self, event: TimerFired) -> None:
        if event.kind == TimerKind.PIPELINE_TIMEOUT:
            if self.state not in (PipelineState.FINISHED, PipelineState.REVOKED):
                self.revoke_nodes(lambda node_id: True, "the pipeline timed out")
                self.set_pipeline_state(PipelineState.REVOKED)
            return
        run = self.nodes.get(event.node_id)
        if run is None or run.version != event.version or run.state is not NodeState.RUNNING:
            return  # the attempt ended before its timer
        node = self.tree.nodes[run.node_id]
        self.stop_attempt(run, f"timed out after {node.timeout_ms / 1000:g} s", skip=node.timeout_skips)


def _is_appointment(run: NodeRun) -> bool:
    """A pause appointment: the node shows SUSPENDED before any path reached it."""
    return run.state is NodeState.SUSPENDED and run.started_at == 0


def _level(scope: str) -> str:
    return f"subprocess {scope!r}" if scope else "the pipeline"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"variable {exc.args[0]} is not defined"
    return str(exc)
