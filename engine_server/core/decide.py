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

import functools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from engine_server.core.expressions import (
    Condition,
    ExpressionError,
    Splice,
    compile_condition,
    compile_splice,
)
from engine_server.core.lazy import LazyError, resolve_lazy
from engine_server.core.model import (
    END_EVENTS,
    TASK_NODES,
    Join,
    NodeRun,
    NodeSpec,
    NodeState,
    NodeType,
    PipelineState,
    Snapshot,
    VarSpec,
)
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
    # True when variables, joins or outputs changed (the pipeline's runtime data must be saved).
    runtime_changed: bool = False


# ---------------------------------------------------------------- the function


def decide(snapshot: Snapshot, event: Event, now: int) -> Decision:
    step = _Step(snapshot, now)
    if isinstance(event, StartPipeline):
        step.start(event)
    elif isinstance(event, TaskCompleted):
        step.task_completed(event)
    else:
        step.task_failed(event)
    if step.rejection is None:
        step.settle()
    return step.decision()


@functools.lru_cache(maxsize=4096)
def _condition(text: str) -> Condition:
    return compile_condition(text)


@functools.lru_cache(maxsize=16384)
def _splice(text: str) -> Splice:
    return compile_splice(text)


class VariableError(Exception):
    """A variable could not be rendered; the message names it."""


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
        self._rendering: list[tuple[str, str]] = []

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
            contexts=self.contexts,
            joins=self.joins,
            outputs=self.outputs,
            failed_count=self.failed_count,
        )
        return Decision(
            snapshot,
            tuple(self.changed),
            tuple(self.histories),
            tuple(self.commands),
            tuple(self.changes),
            runtime_changed=self.runtime_changed,
        )

    def reject(self, kind: str, message: str) -> None:
        self.rejection = Rejection(kind, message)

    def new_version(self) -> str:
        self.version_seq += 1
        return f"v{self.version_seq}"

    def put(self, run: NodeRun) -> None:
        old = self.nodes.get(run.node_id)
        old_state = old.state.value if old is not None else ""
        if old is not None and old.version != run.version:
            old = None  # a new attempt: its predecessor went to history
        unchanged = old is not None and old.state is run.state  # an update of the same attempt's data
        if not unchanged and not can_transition(old.state if old is not None else None, run.state):
            raise AssertionError(f"node {run.node_id}: {old_state} -> {run.state.value} is not a transition")
        if old is None or old.state is not run.state:
            self.changes.append(StateChange(run.node_id, old_state, run.state.value, run.version, self.now))
        was_failed = old is not None and old.state is NodeState.FAILED
        self.failed_count += (run.state is NodeState.FAILED) - was_failed
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
            return _splice(value).render(lambda name: self.lookup(scope, f"${{{name}}}"))
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
        self.walk([_Arrival(first, ())])

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
        done = replace(run, state=NodeState.FINISHED, outputs=outputs, finished_at=self.now, awaiting_callback=False)
        self.put(done)
        self.write_outputs(run.node_id, outputs)
        self.move_on(done)

    def task_failed(self, event: TaskFailed) -> None:
        run = self.current_attempt(event.node_id, event.version)
        if run is None:
            return
        node = self.tree.nodes[run.node_id]
        outputs = {**run.outputs, **event.outputs, "_result": False, "ex_data": event.message}
        failed = replace(run, state=NodeState.FAILED, outputs=outputs, finished_at=self.now, awaiting_callback=False)
        retry_budget = node.auto_retry_times or (event.transient_retry_budget if event.retryable else 0)
        if run.retry < retry_budget:
            delay = max(event.retry_after_ms, node.auto_retry_interval_ms)
            self.retry(failed, available_at=self.now + delay)
            return
        self.write_outputs(run.node_id, outputs)
        if node.error_ignorable:
            ignored = replace(failed, state=NodeState.FINISHED, error_ignored=True)
            self.put(ignored)
            self.move_on(ignored)
            return
        self.put(failed)

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
        if old is not None:
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
                replace(run, state=NodeState.RUNNING, finished_at=0, outputs={}),
                f"node {node.id!r} was entered {loop} times, over the rerun limit of {self.old.rerun_limit}",
            )
            return None
        self.put(run)
        return run

    def fail(self, run: NodeRun, message: str) -> None:
        self.put(
            replace(
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
        run = replace(run, inputs=inputs)
        self.put(run)
        self.offer(run, TaskKind.EXECUTE, available_at=self.now)

    def enter_subprocess(self, node: NodeSpec, forks: tuple[str, ...]) -> list[_Arrival]:
        run = self.enter(node, forks, NodeState.RUNNING)
        if run is None:
            return []
        parent = self.tree.scope_of[node.id]
        child = node.subprocess
        assert child is not None
        try:
            params = {key: self.render_var(parent, var) for key, var in node.params.items()}
            self.put(replace(run, inputs=params))
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
        done = replace(
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

    def choose_branches(self, node: NodeSpec, forks: tuple[str, ...]) -> list[_Arrival]:
        """Exclusive and conditional parallel gateways: evaluate conditions and pick the flows to take."""
        run = self.enter(node, forks, NodeState.RUNNING)
        if run is None:
            return []
        scope = self.tree.scope_of[node.id]
        taken: list[str] = []
        for flow_id in node.outgoing:
            text = node.conditions.get(flow_id)
            if text is None:
                continue
            try:
                if _condition(text).evaluate(lambda name: self.lookup(scope, f"${{{name}}}")):
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
            self.put(replace(run, state=NodeState.FINISHED, finished_at=self.now, outputs={"_result": True}))
            return [_Arrival(self.tree.flows[taken[0]].target, forks)]
        self.put(replace(run, state=NodeState.FINISHED, finished_at=self.now, outputs={"_result": True}))
        self.open_join(node.id, len(taken))
        return [_Arrival(self.tree.flows[flow_id].target, (*forks, node.id)) for flow_id in taken]

    # ------------------------------------------------------------ tasks and failure

    def offer(self, run: NodeRun, kind: str, *, available_at: int, callback_data: Any = None) -> None:
        node = self.tree.nodes[run.node_id]
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
                if run.state is NodeState.FAILED:
                    failed.add(scope)
                elif run.state in ACTIVE_NODE_STATES:
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


def _level(scope: str) -> str:
    return f"subprocess {scope!r}" if scope else "the pipeline"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"variable {exc.args[0]} is not defined"
    return str(exc)
