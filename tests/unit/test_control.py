"""Control operations in the pure core, as an operator sees them.

1. A table of every (operation x target state) pair: accepted and changed, accepted as an idempotent repeat, or
   rejected with the right kind and a message naming the target's state (or the reason).
2. Each operation's effect, step by step through `decide`.
3. A Hypothesis state machine that throws random operations and task results at a small tree and checks the
   invariants the server relies on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine_server.core.decide import (
    Callback,
    CancelTasks,
    Decision,
    Event,
    ForceFail,
    OfferTask,
    PauseNode,
    PausePipeline,
    ResumeNode,
    ResumePipeline,
    RetryNode,
    RetrySubprocess,
    RevokePipeline,
    SkipConditionalParallelGateway,
    SkipExclusiveGateway,
    SkipNode,
    StartPipeline,
    StartTimer,
    StateChange,
    TaskCompleted,
    TaskFailed,
    TaskKind,
    TimerFired,
    TimerKind,
    decide,
)
from engine_server.core.model import TASK_NODES, NodeRun, NodeState, PipelineState, Snapshot
from engine_server.core.tree import parse_tree
from tests.flows import data
from worker_sdk.builder import (
    ConditionalParallelGateway,
    ConvergeGateway,
    Element,
    EmptyEndEvent,
    EmptyStartEvent,
    ExclusiveGateway,
    NodeOutput,
    ParallelGateway,
    ServiceActivity,
    SubProcess,
    Var,
    build_tree,
)

NOW = 1_700_000_000_000
RUNNING, SUSPENDED, FINISHED, FAILED, REVOKED = (
    NodeState.RUNNING,
    NodeState.SUSPENDED,
    NodeState.FINISHED,
    NodeState.FAILED,
    NodeState.REVOKED,
)

# ---------------------------------------------------------------- driving decide


def work(node_id: str, **options: Any) -> ServiceActivity:
    return ServiceActivity(component_code="work", id=node_id, **options)


def subprocess(node_id: str, *inner: Element) -> SubProcess:
    """A subprocess `node_id` running `inner` in a chain (its start and end are `<id>_start`, `<id>_end`)."""
    start = EmptyStartEvent(id=f"{node_id}_start")
    tail: Element = start
    for node in inner:
        tail = tail.extend(node)
    tail.extend(EmptyEndEvent(id=f"{node_id}_end"))
    return SubProcess(start=start, id=node_id)


def chain(*nodes: Element, variables: Any = None) -> dict[str, Any]:
    """start -> nodes... -> end."""
    start = EmptyStartEvent(id="start")
    tail: Element = start
    for node in nodes:
        tail = tail.extend(node)
    tail.extend(EmptyEndEvent(id="end"))
    return build_tree(start, data=variables)


def begin(tree: dict[str, Any], timeout_ms: int = 0, **inputs: Any) -> Decision:
    spec = parse_tree(tree)
    presets = {f"${{{key}}}": value for key, value in inputs.items()}
    snapshot = Snapshot("p1", spec, PipelineState.RUNNING, {}, {}, presets=presets)
    return accepted(snapshot, StartPipeline(timeout_ms=timeout_ms))


def accepted(snapshot: Snapshot, event: Event, now: int = NOW) -> Decision:
    decision = decide(snapshot, event, now)
    assert decision.rejection is None, f"{event} was rejected: {decision.rejection}"
    return decision


def rejected(snapshot: Snapshot, event: Event) -> tuple[str, str]:
    decision = decide(snapshot, event, NOW)
    assert decision.rejection is not None, f"{event} was accepted"
    assert decision.snapshot is snapshot
    return decision.rejection.kind, decision.rejection.message


def version(snapshot: Snapshot, node_id: str) -> str:
    return snapshot.nodes[node_id].version


def complete(snapshot: Snapshot, node_id: str, outputs: dict[str, Any] | None = None, **options: Any) -> Snapshot:
    return accepted(snapshot, TaskCompleted(node_id, version(snapshot, node_id), outputs or {}, **options)).snapshot


def fail(snapshot: Snapshot, node_id: str, message: str = "ValueError: boom") -> Snapshot:
    return accepted(snapshot, TaskFailed(node_id, version(snapshot, node_id), message)).snapshot


def state(snapshot: Snapshot, node_id: str) -> NodeState | None:
    run = snapshot.nodes.get(node_id)
    return run.state if run is not None else None


def offers(decision: Decision) -> list[OfferTask]:
    return [c for c in decision.commands if isinstance(c, OfferTask)]


def cancels(decision: Decision) -> list[CancelTasks]:
    return [c for c in decision.commands if isinstance(c, CancelTasks)]


def timers(decision: Decision) -> list[StartTimer]:
    return [c for c in decision.commands if isinstance(c, StartTimer)]


def flow_to(snapshot: Snapshot, source: str, target: str) -> str:
    tree = snapshot.spec.tree
    [flow_id] = [f for f in tree.nodes[source].outgoing if tree.flows[f].target == target]
    return flow_id


# ---------------------------------------------------------------- 1. the table

# One tree holds every kind of target, each behind a "gate" activity so that it can also be "not reached";
# the keeper `k` keeps the pipeline RUNNING while a target fails.
#
#   start -> pg -> ga -> a                                   (activity)
#               -> ge -> eg -(${route}==1)-> e1 -> cge       (exclusive gateway)
#                          -(${route}==2)-> e2 ->
#               -> gc -> cpg -(${fan}>=1)-> c1 -> cgc        (conditional parallel gateway)
#                            -(${fan}>=2)-> c2 ->
#               -> gs -> s [s_start -> sa -> s_end]          (subprocess)
#               -> k
#          -> cg -> end


def control_tree() -> dict[str, Any]:
    start, pg, cg = EmptyStartEvent(id="start"), ParallelGateway(id="pg"), ConvergeGateway(id="cg")
    ga = work("ga")
    ga.extend(work("a"))
    ge, eg = work("ge"), ExclusiveGateway({0: "${route} == 1", 1: "${route} == 2"}, id="eg")
    ge.extend(eg).connect(work("e1"), work("e2")).to(eg).converge(ConvergeGateway(id="cge"))
    gc, cpg = work("gc"), ConditionalParallelGateway({0: "${fan} >= 1", 1: "${fan} >= 2"}, id="cpg")
    gc.extend(cpg).connect(work("c1"), work("c2")).to(cpg).converge(ConvergeGateway(id="cgc"))
    gs = work("gs")
    gs.extend(subprocess("s", work("sa")))
    start.extend(pg).connect(ga, ge, gc, gs, work("k")).to(pg).converge(cg).extend(EmptyEndEvent(id="end"))
    return build_tree(start, data=data(route=1, fan=2))


TARGETS = {"activity": "a", "subprocess": "s", "exclusive": "eg", "conditional": "cpg"}
GATES = {"a": "ga", "s": "gs", "eg": "ge", "cpg": "gc"}
# The state each fixture label stands for; "appointed" is a pause appointment (SUSPENDED before arrival).
LABEL_STATES: dict[str, NodeState | None] = {
    "none": None,
    "appointed": SUSPENDED,
    "running": RUNNING,
    "awaiting": RUNNING,
    "paused": SUSPENDED,
    "failed": FAILED,
    "finished": FINISHED,
    "revoked": REVOKED,
}


@functools.cache
def reach(kind: str, label: str) -> tuple[Snapshot, str]:
    """A snapshot where the `kind` target is in state `label` (the pipeline RUNNING), and the target's id."""
    failing_gateway = label == "failed"
    route = 0 if kind == "exclusive" and failing_gateway else 1
    fan = 0 if kind == "conditional" and failing_gateway else 2
    snapshot = begin(control_tree(), route=route, fan=fan).snapshot
    target = TARGETS[kind]
    if kind == "activity" and label == "revoked":
        # A root activity is revoked only with its pipeline; inside a revoked subprocess the pipeline stays open.
        snapshot = complete(snapshot, "gs")
        snapshot = accepted(snapshot, RevokePipeline(scope="s")).snapshot
        target = "sa"
    elif label == "appointed":
        snapshot = accepted(snapshot, PauseNode(target)).snapshot
    elif label != "none":
        snapshot = complete(snapshot, GATES[target])
        if label == "awaiting":
            snapshot = complete(snapshot, "a", await_callback=True)
        elif label == "paused":
            snapshot = accepted(snapshot, PausePipeline(scope="s")).snapshot
        elif label == "revoked":
            snapshot = accepted(snapshot, RevokePipeline(scope="s")).snapshot
        elif label in ("failed", "finished") and kind in ("activity", "subprocess"):
            worker = "a" if kind == "activity" else "sa"
            snapshot = fail(snapshot, worker) if label == "failed" else complete(snapshot, worker)
    assert state(snapshot, target) is LABEL_STATES[label]
    assert (target in snapshot.nodes and snapshot.nodes[target].started_at == 0) == (label == "appointed")
    if label == "awaiting":
        assert snapshot.nodes[target].awaiting_callback
    assert snapshot.state is PipelineState.RUNNING
    return snapshot, target


def _flows_of(snapshot: Snapshot, node_id: str) -> tuple[str, ...]:
    node = snapshot.spec.tree.nodes.get(node_id)
    return (tuple(node.outgoing) if node is not None else ()) or ("no-such-flow",)


def _version_or_none(snapshot: Snapshot, node_id: str) -> str:
    run = snapshot.nodes.get(node_id)
    return run.version if run is not None else "v0"


OPERATIONS: dict[str, Callable[[Snapshot, str], Event]] = {
    "pause_scope": lambda s, t: PausePipeline(scope=t),
    "resume_scope": lambda s, t: ResumePipeline(scope=t),
    "revoke_scope": lambda s, t: RevokePipeline(scope=t),
    "pause_node": lambda s, t: PauseNode(t),
    "resume_node": lambda s, t: ResumeNode(t),
    "retry_node": lambda s, t: RetryNode(t),
    "retry_subprocess": lambda s, t: RetrySubprocess(t),
    "skip_node": lambda s, t: SkipNode(t),
    "skip_exclusive": lambda s, t: SkipExclusiveGateway(t, _flows_of(s, t)[0]),
    "skip_conditional": lambda s, t: SkipConditionalParallelGateway(t, _flows_of(s, t)),
    "force_fail": lambda s, t: ForceFail(t, "stopped by the operator"),
    "callback": lambda s, t: Callback(t, _version_or_none(s, t), {"approved": True}),
}

# Outcomes:  >susp >run >fail >done >rvk   accepted, changed; the target is now SUSPENDED, RUNNING, FAILED,
#                                          FINISHED or REVOKED
#            >gone   accepted, changed; the target has no state any more (an appointment lifted)
#            =       accepted, nothing changed (an idempotent repeat), and no commands
#            S       rejected, failed_precondition, the message names the target's current state
#                    ("has not been reached" for no state or a pause appointment)
#            T       rejected, invalid_argument, the message names the target's node type: the operation does not
#                    apply to this kind of node, whatever its state
#            W       rejected, failed_precondition, "not waiting for a callback"
CHANGED_TO: dict[str, NodeState | None] = {
    ">susp": SUSPENDED,
    ">run": RUNNING,
    ">fail": FAILED,
    ">done": FINISHED,
    ">rvk": REVOKED,
    ">gone": None,
}
COLUMNS = (
    "pause_scope",
    "resume_scope",
    "revoke_scope",
    "pause_node",
    "resume_node",
    "retry_node",
    "retry_subprocess",
    "skip_node",
    "skip_exclusive",
    "skip_conditional",
    "force_fail",
    "callback",
)
# fmt: off
TABLE = {
    # pause/resume/revoke_scope are PausePipeline/ResumePipeline/RevokePipeline(scope=target).
    #                              pauseS resumS revokS pauseN resumN retryN retryS skipN  skipEG skipCP force  callbk
    ("activity", "none"):         "T      T      T      >susp  =      S      T      S      T      T      S      S",
    ("activity", "appointed"):    "T      T      T      =      >gone  S      T      S      T      T      S      S",
    ("activity", "running"):      "T      T      T      S      =      S      T      S      T      T      >fail  W",
    ("activity", "awaiting"):     "T      T      T      S      =      S      T      S      T      T      >fail  >run",
    ("activity", "failed"):       "T      T      T      S      S      >run   T      >done  T      T      S      S",
    ("activity", "finished"):     "T      T      T      S      S      S      T      S      T      T      S      S",
    ("activity", "revoked"):      "T      T      T      S      S      S      T      S      T      T      S      S",
    ("subprocess", "none"):       "S      S      S      >susp  =      T      S      S      T      T      T      T",
    ("subprocess", "appointed"):  "S      S      S      =      >gone  T      S      S      T      T      T      T",
    ("subprocess", "running"):    ">susp  =      >rvk   S      =      T      S      S      T      T      T      T",
    ("subprocess", "paused"):     "=      >run   >rvk   S      S      T      S      S      T      T      T      T",
    ("subprocess", "failed"):     "S      S      >rvk   S      S      T      >run   >done  T      T      T      T",
    ("subprocess", "finished"):   "S      S      S      S      S      T      S      S      T      T      T      T",
    ("subprocess", "revoked"):    "S      S      =      S      S      T      S      S      T      T      T      T",
    ("exclusive", "none"):        "T      T      T      >susp  =      S      T      T      S      T      T      T",
    ("exclusive", "appointed"):   "T      T      T      =      >gone  S      T      T      S      T      T      T",
    ("exclusive", "failed"):      "T      T      T      S      S      >fail  T      T      >done  T      T      T",
    ("exclusive", "finished"):    "T      T      T      S      S      S      T      T      S      T      T      T",
    ("conditional", "none"):      "T      T      T      >susp  =      S      T      T      T      S      T      T",
    ("conditional", "appointed"): "T      T      T      =      >gone  S      T      T      T      S      T      T",
    ("conditional", "failed"):    "T      T      T      S      S      >fail  T      T      T      >done  T      T",
    ("conditional", "finished"):  "T      T      T      S      S      S      T      T      T      S      T      T",
}
# fmt: on
CASES = [
    pytest.param(kind, label, operation, outcome, id=f"{operation}-{kind}-{label}")
    for (kind, label), row in TABLE.items()
    for operation, outcome in zip(COLUMNS, row.split(), strict=True)
]


def _state_words(snapshot: Snapshot, target: str) -> str:
    run = snapshot.nodes.get(target)
    return "has not been reached" if run is None or run.started_at == 0 else run.state.value


@pytest.mark.parametrize(("kind", "label", "operation", "outcome"), CASES)
def test_every_operation_on_every_node_state(kind: str, label: str, operation: str, outcome: str) -> None:
    snapshot, target = reach(kind, label)
    decision = decide(snapshot, OPERATIONS[operation](snapshot, target), NOW)
    rejection = decision.rejection  # (locals keep pytest from printing whole snapshots on failure)
    if outcome in CHANGED_TO:
        assert rejection is None
        changed, now = decision.changed, state(decision.snapshot, target)
        assert (changed, now) == (True, CHANGED_TO[outcome])
        return
    if outcome == "=":
        assert rejection is None
        changed, commands = decision.changed, decision.commands
        assert (changed, commands) == (False, ())  # the server drops an unchanged decision, commands and all
        assert decision.snapshot == snapshot
        return
    assert rejection is not None, f"accepted (changed={decision.changed}); wanted a rejection"
    assert decision.snapshot is snapshot
    message = rejection.message
    assert repr(target) in message, message
    if outcome == "S":
        names_state = _state_words(snapshot, target) in message
        assert (rejection.kind, names_state) == ("failed_precondition", True), message
    elif outcome == "T":
        node_type = snapshot.spec.tree.nodes[target].type.value
        names_type = node_type in message or "not an activit" in message
        assert (rejection.kind, names_type) == ("invalid_argument", True), message
    elif outcome == "W":
        says_why = "not waiting for a callback" in message
        assert (rejection.kind, says_why) == ("failed_precondition", True), message
    else:
        raise AssertionError(f"unknown outcome {outcome!r}")


def reach_pipeline(label: str) -> Snapshot:
    tree = chain(work("a"), work("b"))
    snapshot = begin(tree).snapshot
    if label == "SUSPENDED":
        snapshot = accepted(snapshot, PausePipeline()).snapshot
    elif label == "FAILED":
        snapshot = fail(snapshot, "a")
    elif label == "FINISHED":
        snapshot = complete(complete(snapshot, "a"), "b")
    elif label == "REVOKED":
        snapshot = accepted(snapshot, RevokePipeline()).snapshot
    assert snapshot.state is PipelineState[label]
    return snapshot


# Outcomes as above; >STATE is the pipeline's new state, S names the pipeline's current state.
PIPELINE_TABLE = {
    #             pause         resume      revoke
    "RUNNING": (">SUSPENDED", "=", ">REVOKED"),
    "SUSPENDED": ("=", ">RUNNING", ">REVOKED"),
    "FAILED": ("S", "S", ">REVOKED"),
    "FINISHED": ("S", "S", "S"),
    "REVOKED": ("S", "S", "="),
}
PIPELINE_OPERATIONS = {"pause": PausePipeline(), "resume": ResumePipeline(), "revoke": RevokePipeline()}


@pytest.mark.parametrize(
    ("label", "operation", "outcome"),
    [
        pytest.param(label, operation, outcome, id=f"{operation}-{label}")
        for label, row in PIPELINE_TABLE.items()
        for operation, outcome in zip(PIPELINE_OPERATIONS, row, strict=True)
    ],
)
def test_every_pipeline_operation_on_every_pipeline_state(label: str, operation: str, outcome: str) -> None:
    snapshot = reach_pipeline(label)
    decision = decide(snapshot, PIPELINE_OPERATIONS[operation], NOW)
    if outcome.startswith(">"):
        assert decision.rejection is None, decision.rejection
        assert (decision.changed, decision.snapshot.state) == (True, PipelineState[outcome[1:]])
    elif outcome == "=":
        assert decision.rejection is None, decision.rejection
        assert (decision.changed, decision.commands) == (False, ())
    else:
        assert decision.rejection is not None, f"accepted (changed={decision.changed}); wanted a rejection"
        assert decision.rejection.kind == "failed_precondition"
        assert label in decision.rejection.message and "'p1'" in decision.rejection.message


def closed_pipeline(label: str) -> Snapshot:
    """The control tree, FINISHED; or REVOKED after `a` and `s` started and both gateways failed."""
    if label == "FINISHED":
        snapshot = begin(control_tree(), route=1, fan=2).snapshot
        for node_id in ("ga", "a", "ge", "e1", "gc", "c1", "c2", "gs", "sa", "k"):
            snapshot = complete(snapshot, node_id)
    else:
        snapshot = begin(control_tree(), route=0, fan=0).snapshot
        for node_id in ("ga", "ge", "gc", "gs"):
            snapshot = complete(snapshot, node_id)
        snapshot = accepted(snapshot, RevokePipeline()).snapshot
        assert (state(snapshot, "a"), state(snapshot, "s")) == (REVOKED, REVOKED)
        assert state(snapshot, "eg") in (FAILED, REVOKED)
    assert snapshot.state is PipelineState[label]
    return snapshot


@pytest.mark.parametrize("label", ["FINISHED", "REVOKED"])
@pytest.mark.parametrize(
    ("operation", "target"),
    [
        ("pause_scope", "s"),
        ("resume_scope", "s"),
        ("pause_node", "e2"),
        ("resume_node", "e2"),
        ("retry_node", "a"),
        ("retry_node", "eg"),
        ("retry_subprocess", "s"),
        ("skip_node", "a"),
        ("skip_exclusive", "eg"),
        ("skip_conditional", "cpg"),
        ("force_fail", "a"),
        ("callback", "a"),
    ],
)
def test_a_closed_pipeline_refuses_every_node_operation_saying_why(label: str, operation: str, target: str) -> None:
    snapshot = closed_pipeline(label)
    kind, message = rejected(snapshot, OPERATIONS[operation](snapshot, target))
    assert kind == "failed_precondition"
    assert label in message, message


def test_revoking_a_closed_pipeline_again() -> None:
    revoked = closed_pipeline("REVOKED")
    decision = accepted(revoked, RevokePipeline(scope="s"))
    assert (decision.changed, decision.commands) == (False, ())
    kind, message = rejected(closed_pipeline("FINISHED"), RevokePipeline(scope="s"))
    assert (kind, "FINISHED" in message) == ("failed_precondition", True)


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_an_unknown_node_is_not_found(operation: str) -> None:
    snapshot = begin(control_tree()).snapshot
    kind, message = rejected(snapshot, OPERATIONS[operation](snapshot, "nope"))
    assert (kind, "'nope'" in message) == ("not_found", True)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: (SkipExclusiveGateway("eg", flow_to(s, "cpg", "c1")), flow_to(s, "cpg", "c1")),
        lambda s: (SkipConditionalParallelGateway("cpg", ()), "name outgoing flows"),
        lambda s: (SkipConditionalParallelGateway("cpg", (flow_to(s, "cpg", "c1"), "f-unknown")), "not f-unknown"),
    ],
)
def test_skipping_a_gateway_to_a_flow_it_does_not_have_is_an_invalid_argument(make: Any) -> None:
    snapshot = begin(control_tree(), route=0, fan=0).snapshot
    snapshot = complete(complete(snapshot, "ge"), "gc")
    event, fragment = make(snapshot)
    kind, message = rejected(snapshot, event)
    assert (kind, fragment in message) == ("invalid_argument", True), message


def test_a_node_marked_not_retryable_or_not_skippable_says_so() -> None:
    snapshot = fail(begin(chain(work("a", retryable=False, skippable=False))).snapshot, "a")
    assert rejected(snapshot, RetryNode("a")) == (
        "failed_precondition",
        "node 'a' is not retryable (retryable: false in the tree)",
    )
    assert rejected(snapshot, SkipNode("a")) == (
        "failed_precondition",
        "node 'a' is not skippable (skippable: false in the tree)",
    )


# ---------------------------------------------------------------- 2. each operation's effect


def test_pause_pipeline_lets_the_running_node_finish_and_holds_the_next_until_resume() -> None:
    snapshot = begin(chain(work("a"), work("b"))).snapshot
    paused = accepted(snapshot, PausePipeline())
    assert paused.snapshot.state is PipelineState.SUSPENDED
    assert paused.changes == (StateChange("", "RUNNING", "SUSPENDED", "", NOW),)
    assert paused.commands == ()  # the running task is not withdrawn

    finished_a = accepted(paused.snapshot, TaskCompleted("a", version(snapshot, "a"), {"x": 1}))
    assert state(finished_a.snapshot, "a") is FINISHED
    assert state(finished_a.snapshot, "b") is None  # not reached while paused
    assert offers(finished_a) == []
    assert finished_a.snapshot.state is PipelineState.SUSPENDED

    resumed = accepted(finished_a.snapshot, ResumePipeline())
    assert resumed.snapshot.state is PipelineState.RUNNING
    assert state(resumed.snapshot, "b") is RUNNING
    assert [(o.node_id, o.kind) for o in offers(resumed)] == [("b", TaskKind.EXECUTE)]
    assert resumed.snapshot.parked == ()
    assert complete(resumed.snapshot, "b").state is PipelineState.FINISHED


def test_pausing_a_subprocess_holds_its_path_while_the_root_stays_running() -> None:
    snapshot = begin(chain(subprocess("s", work("sa")), work("after"))).snapshot
    paused = accepted(snapshot, PausePipeline(scope="s")).snapshot
    assert (state(paused, "s"), paused.state) == (SUSPENDED, PipelineState.RUNNING)

    inner_done = complete(paused, "sa")
    assert state(inner_done, "sa") is FINISHED
    assert state(inner_done, "s_end") is None and state(inner_done, "after") is None
    assert (state(inner_done, "s"), inner_done.state) == (SUSPENDED, PipelineState.RUNNING)

    resumed = accepted(inner_done, ResumePipeline(scope="s"))
    assert state(resumed.snapshot, "s") is FINISHED
    assert [o.node_id for o in offers(resumed)] == ["after"]
    assert resumed.snapshot.state is PipelineState.RUNNING


def test_pause_node_appointment_shows_suspended_at_once_and_stops_the_path_on_arrival() -> None:
    snapshot = begin(chain(work("a"), work("b"), work("c"))).snapshot
    appointed = accepted(snapshot, PauseNode("b"))
    assert [(c.node_id, c.old_state, c.new_state) for c in appointed.changes] == [("b", "", "SUSPENDED")]
    assert appointed.commands == ()

    arrived = accepted(appointed.snapshot, TaskCompleted("a", version(snapshot, "a")))
    assert state(arrived.snapshot, "b") is SUSPENDED  # the path stopped there
    assert state(arrived.snapshot, "c") is None
    assert offers(arrived) == []
    assert arrived.snapshot.state is PipelineState.RUNNING

    resumed = accepted(arrived.snapshot, ResumeNode("b"))
    run = resumed.snapshot.nodes["b"]
    assert (run.state, run.loop, run.retry) == (RUNNING, 1, 0)
    assert run.version != appointed.snapshot.nodes["b"].version
    assert [o.node_id for o in offers(resumed)] == ["b"]
    assert resumed.snapshot.parked == ()


def test_resume_node_before_arrival_lifts_the_appointment_and_the_path_runs_through() -> None:
    snapshot = begin(chain(work("a"), work("b"))).snapshot
    appointed = accepted(snapshot, PauseNode("b")).snapshot
    lifted = accepted(appointed, ResumeNode("b"))
    assert "b" not in lifted.snapshot.nodes
    assert lifted.removed_node_ids == ("b",)
    assert [(c.node_id, c.old_state, c.new_state) for c in lifted.changes] == [("b", "SUSPENDED", "")]

    arrived = accepted(lifted.snapshot, TaskCompleted("a", version(snapshot, "a")))
    assert state(arrived.snapshot, "b") is RUNNING
    assert arrived.snapshot.nodes["b"].loop == 1
    assert [o.node_id for o in offers(arrived)] == ["b"]


def test_revoke_withdraws_every_running_task_and_reaches_nothing_downstream() -> None:
    start, pg, cg = EmptyStartEvent(id="start"), ParallelGateway(id="pg"), ConvergeGateway(id="cg")
    start.extend(pg).connect(work("x"), work("y")).to(pg).converge(cg).extend(work("z")).extend(EmptyEndEvent())
    snapshot = begin(build_tree(start)).snapshot
    snapshot = complete(snapshot, "y", await_callback=True)  # a task node waiting for a callback is revoked too
    decision = accepted(snapshot, RevokePipeline(reason="wrong release"))
    after = decision.snapshot
    assert after.state is PipelineState.REVOKED and after.finished_at == NOW
    assert (state(after, "x"), state(after, "y")) == (REVOKED, REVOKED)
    assert {(c.node_id, c.version, c.reason) for c in cancels(decision)} == {
        ("x", version(snapshot, "x"), "wrong release"),
        ("y", version(snapshot, "y"), "wrong release"),
    }
    assert state(after, "cg") is None and state(after, "z") is None
    assert offers(decision) == []
    kind, message = rejected(after, TaskCompleted("x", version(snapshot, "x")))
    assert (kind, "REVOKED" in message) == ("failed_precondition", True)


def test_retry_with_new_inputs_keeps_the_failed_attempt_in_history() -> None:
    node = work("a")
    node.component.inputs.n = Var(type=Var.PLAIN, value=1)
    snapshot = begin(chain(node, work("b"))).snapshot
    old_version = version(snapshot, "a")
    failed = accepted(snapshot, TaskFailed("a", old_version, "ValueError: n too small", {"partial": 1})).snapshot
    assert failed.state is PipelineState.FAILED

    retried = accepted(failed, RetryNode("a", inputs={"n": 2}))
    [history] = retried.histories
    assert (history.version, history.state, history.retry) == (old_version, FAILED, 0)
    assert history.inputs == {"n": 1, "_loop": 1, "_inner_loop": 1}
    assert history.outputs == {"partial": 1, "_result": False, "ex_data": "ValueError: n too small"}
    run = retried.snapshot.nodes["a"]
    assert (run.state, run.retry, run.outputs) == (RUNNING, 1, {})
    assert run.version not in (old_version, *(r.version for r in failed.nodes.values()))
    [offer] = offers(retried)
    assert (offer.version, offer.retry, offer.inputs) == (run.version, 1, {"n": 2, "_loop": 1, "_inner_loop": 1})
    assert retried.snapshot.state is PipelineState.RUNNING
    assert complete(retried.snapshot, "a").nodes["b"].state is RUNNING


def gateway_tree(kind: type[ExclusiveGateway] | type[ConditionalParallelGateway], branches: int) -> dict[str, Any]:
    """start -> gw (branch i taken when ${n} > i) -> x0..xN -> join -> after -> end."""
    start = EmptyStartEvent(id="start")
    gateway = kind({i: f"${{n}} > {i}" for i in range(branches)}, id="gw")
    start.extend(gateway).connect(*(work(f"x{i}") for i in range(branches))).to(gateway).converge(
        ConvergeGateway(id="join")
    ).extend(work("after")).extend(EmptyEndEvent(id="end"))
    return build_tree(start, data=data(n=0))


def test_retrying_a_failed_exclusive_gateway_without_fixing_anything_fails_it_again() -> None:
    snapshot = begin(gateway_tree(ExclusiveGateway, 2), n=0).snapshot
    old = snapshot.nodes["gw"]
    assert (old.state, old.outputs["ex_data"], snapshot.state) == (
        FAILED,
        "all conditions of branches are not meet",
        PipelineState.FAILED,
    )
    retried = accepted(snapshot, RetryNode("gw"))
    run = retried.snapshot.nodes["gw"]
    assert (run.state, run.retry, run.outputs["ex_data"]) == (FAILED, 1, "all conditions of branches are not meet")
    assert run.version != old.version
    assert [h.version for h in retried.histories] == [old.version]
    assert retried.snapshot.state is PipelineState.FAILED
    assert state(retried.snapshot, "x0") is None and state(retried.snapshot, "x1") is None


def test_retry_subprocess_runs_the_subprocess_again_from_its_start() -> None:
    snapshot = begin(chain(subprocess("s", work("sa")), work("after"))).snapshot
    first_inner = version(snapshot, "sa")
    failed = fail(snapshot, "sa")
    assert (state(failed, "s"), failed.state) == (FAILED, PipelineState.FAILED)
    assert "node sa failed" in failed.nodes["s"].outputs["ex_data"]

    retried = accepted(failed, RetrySubprocess("s"))
    sub = retried.snapshot.nodes["s"]
    assert (sub.state, sub.retry) == (RUNNING, 1)
    assert sub.version != failed.nodes["s"].version
    inner = retried.snapshot.nodes["sa"]
    assert (inner.state, inner.version != first_inner) == (RUNNING, True)
    assert [o.node_id for o in offers(retried)] == ["sa"]
    assert retried.snapshot.state is PipelineState.RUNNING
    done = complete(retried.snapshot, "sa")
    assert (state(done, "s"), state(done, "after")) == (FINISHED, RUNNING)


def skip_tree() -> dict[str, Any]:
    """start -> a -> b -> end; b renders ${r}, a's output `result` (default "default")."""
    reader = work("b")
    reader.component.inputs.seen = Var(type=Var.SPLICE, value="${r}")
    variables = data()
    variables.inputs["${r}"] = NodeOutput(source_act="a", source_key="result", type=Var.PLAIN, value="default")
    return chain(work("a"), reader, variables=variables)


def test_skip_finishes_the_failed_node_with_the_skip_flag_without_copying_its_outputs() -> None:
    snapshot = begin(skip_tree()).snapshot
    # The worker left a partial result before the operator stopped it.
    snapshot = complete(snapshot, "a", {"result": "partial"}, await_callback=True)
    snapshot = accepted(snapshot, ForceFail("a", "stuck")).snapshot
    assert snapshot.state is PipelineState.FAILED

    skipped = accepted(snapshot, SkipNode("a"))
    run = skipped.snapshot.nodes["a"]
    assert (run.state, run.skip, run.version) == (FINISHED, True, version(snapshot, "a"))
    [offer] = offers(skipped)
    assert (offer.node_id, offer.inputs["seen"]) == ("b", "default")
    assert skipped.snapshot.state is PipelineState.RUNNING


def test_skip_exclusive_gateway_takes_the_chosen_flow_and_leaves_the_other_unreached() -> None:
    snapshot = begin(gateway_tree(ExclusiveGateway, 2), n=0).snapshot
    skipped = accepted(snapshot, SkipExclusiveGateway("gw", flow_to(snapshot, "gw", "x1")))
    run = skipped.snapshot.nodes["gw"]
    assert (run.state, run.skip) == (FINISHED, True)
    assert (state(skipped.snapshot, "x0"), state(skipped.snapshot, "x1")) == (None, RUNNING)
    assert [o.node_id for o in offers(skipped)] == ["x1"]
    assert skipped.snapshot.state is PipelineState.RUNNING
    assert state(complete(skipped.snapshot, "x1"), "after") is RUNNING


def test_skip_conditional_parallel_gateway_with_two_flows_joins_both() -> None:
    snapshot = begin(gateway_tree(ConditionalParallelGateway, 3), n=0).snapshot
    assert state(snapshot, "gw") is FAILED
    flows = (flow_to(snapshot, "gw", "x0"), flow_to(snapshot, "gw", "x2"))
    skipped = accepted(snapshot, SkipConditionalParallelGateway("gw", flows))
    assert (skipped.snapshot.nodes["gw"].skip, state(skipped.snapshot, "x1")) == (True, None)
    assert sorted(o.node_id for o in offers(skipped)) == ["x0", "x2"]

    one = complete(skipped.snapshot, "x0")
    assert state(one, "join") is None and state(one, "after") is None  # waits for x2
    both = complete(one, "x2")
    assert (state(both, "join"), state(both, "after")) == (FINISHED, RUNNING)


def test_force_fail_fails_the_running_activity_and_tells_its_worker_to_stop() -> None:
    snapshot = begin(chain(work("a"), work("b"))).snapshot
    v = version(snapshot, "a")
    decision = accepted(snapshot, ForceFail("a", "operator: stuck on a lock"))
    run = decision.snapshot.nodes["a"]
    assert run.state is FAILED and run.version == v
    assert run.outputs == {"_result": False, "ex_data": "operator: stuck on a lock", "_forced_failed": True}
    assert cancels(decision) == [CancelTasks("a", v, "operator: stuck on a lock")]
    assert decision.snapshot.state is PipelineState.FAILED
    assert state(decision.snapshot, "b") is None
    kind, message = rejected(decision.snapshot, TaskCompleted("a", v, {"late": True}))
    assert (kind, "FAILED" in message) == ("failed_precondition", True)


def test_callback_is_offered_to_the_worker_and_a_second_one_waits_its_turn() -> None:
    snapshot = begin(chain(work("a"), work("b"))).snapshot
    v = version(snapshot, "a")
    waiting = accepted(snapshot, TaskCompleted("a", v, {"ticket": 7}, await_callback=True))
    assert waiting.snapshot.nodes["a"].awaiting_callback and offers(waiting) == []

    kind, message = rejected(waiting.snapshot, Callback("a", "v999", {"n": 0}))
    assert (kind, "older attempt" in message) == ("failed_precondition", True)

    first = accepted(waiting.snapshot, Callback("a", v, {"n": 1}))
    [offer] = offers(first)
    assert (offer.kind, offer.version, offer.callback_data) == (TaskKind.SCHEDULE, v, {"n": 1})
    assert (offer.outputs, offer.schedule_times) == ({"ticket": 7}, 1)

    queued = accepted(first.snapshot, Callback("a", v, {"n": 2}))  # the worker is still on {"n": 1}
    assert queued.changed and offers(queued) == []

    again = accepted(queued.snapshot, TaskCompleted("a", v, await_callback=True))
    [offer] = offers(again)
    assert (offer.kind, offer.callback_data, offer.schedule_times) == (TaskKind.SCHEDULE, {"n": 2}, 2)
    assert not again.snapshot.nodes["a"].awaiting_callback

    done = accepted(again.snapshot, TaskCompleted("a", v, {"answer": 42}))
    assert done.snapshot.nodes["a"].outputs == {"ticket": 7, "answer": 42, "_result": True}
    assert state(done.snapshot, "b") is RUNNING


def test_a_polling_node_is_not_waiting_for_a_callback() -> None:
    """Only a node that awaits a callback, or whose worker is handling one, takes a callback; data sent to a node
    that is merely polling would wait for an `await_callback` reply that may never come."""
    snapshot = begin(chain(work("a"))).snapshot
    v = version(snapshot, "a")
    polling = complete(snapshot, "a", {"progress": 50}, poll_after_ms=1000)
    assert polling.nodes["a"].schedule_times == 1
    kind, message = rejected(polling, Callback("a", v, {"approved": True}))
    assert (kind, "not waiting for a callback" in message) == ("failed_precondition", True)


def test_a_queued_callback_is_not_delivered_to_a_later_attempt() -> None:
    snapshot = begin(chain(work("a", auto_retry={"enable": True, "times": 1, "interval": 0}))).snapshot
    v1 = version(snapshot, "a")
    snapshot = complete(snapshot, "a", await_callback=True)
    snapshot = accepted(snapshot, Callback("a", v1, {"for": v1, "n": 1})).snapshot
    snapshot = accepted(snapshot, Callback("a", v1, {"for": v1, "n": 2})).snapshot  # queued
    # The worker fails while handling the first callback; auto_retry starts a fresh attempt.
    snapshot = fail(snapshot, "a")
    v2 = version(snapshot, "a")
    assert v2 != v1 and state(snapshot, "a") is RUNNING

    waiting = accepted(snapshot, TaskCompleted("a", v2, await_callback=True))
    assert offers(waiting) == [], "the new attempt was handed a callback sent to the failed one"
    assert waiting.snapshot.nodes["a"].awaiting_callback
    assert waiting.snapshot.callbacks == {}


def test_a_queued_callback_does_not_outlive_its_node() -> None:
    snapshot = begin(chain(work("a"))).snapshot
    v = version(snapshot, "a")
    snapshot = complete(snapshot, "a", await_callback=True)
    snapshot = accepted(snapshot, Callback("a", v, 1)).snapshot
    snapshot = accepted(snapshot, Callback("a", v, 2)).snapshot  # queued behind 1
    done = complete(snapshot, "a")  # the worker decides it is finished
    assert done.state is PipelineState.FINISHED
    assert done.callbacks == {}


def timeout_tree(action: str) -> dict[str, Any]:
    return chain(work("a", timeout_config={"enable": True, "seconds": 5, "action": action}), work("b"))


@pytest.mark.parametrize(
    ("action", "a_state", "skip", "b_state", "pipeline"),
    [
        ("forced_fail", FAILED, False, None, PipelineState.FAILED),
        ("forced_fail_and_skip", FINISHED, True, RUNNING, PipelineState.RUNNING),
    ],
)
def test_node_timeout(
    action: str, a_state: NodeState, skip: bool, b_state: NodeState | None, pipeline: PipelineState
) -> None:
    started = begin(timeout_tree(action))
    v = version(started.snapshot, "a")
    assert timers(started) == [StartTimer(TimerKind.NODE_TIMEOUT, "a", v, NOW + 5000)]
    decision = accepted(started.snapshot, TimerFired(TimerKind.NODE_TIMEOUT, "a", v), NOW + 5000)
    run = decision.snapshot.nodes["a"]
    assert (run.state, run.skip, run.version) == (a_state, skip, v)
    assert (run.outputs["ex_data"], run.outputs["_forced_failed"]) == ("timed out after 5 s", True)
    assert cancels(decision) == [CancelTasks("a", v, "timed out after 5 s")]
    assert state(decision.snapshot, "b") is b_state
    assert decision.snapshot.state is pipeline


def test_a_timer_for_an_attempt_that_moved_on_does_nothing() -> None:
    snapshot = begin(timeout_tree("forced_fail")).snapshot
    v1 = version(snapshot, "a")
    retried = accepted(fail(snapshot, "a"), RetryNode("a"))
    v2 = version(retried.snapshot, "a")
    assert timers(retried) == [StartTimer(TimerKind.NODE_TIMEOUT, "a", v2, NOW + 5000)]
    stale = accepted(retried.snapshot, TimerFired(TimerKind.NODE_TIMEOUT, "a", v1), NOW + 5000)
    assert (stale.changed, stale.commands, state(stale.snapshot, "a")) == (False, (), RUNNING)
    finished = complete(retried.snapshot, "a")
    late = accepted(finished, TimerFired(TimerKind.NODE_TIMEOUT, "a", v2), NOW + 5000)
    assert (late.changed, late.commands) == (False, ())


def test_pipeline_timeout_revokes_the_pipeline() -> None:
    started = begin(chain(work("a"), work("b")), timeout_ms=60_000)
    assert timers(started) == [StartTimer(TimerKind.PIPELINE_TIMEOUT, "", "", NOW + 60_000)]
    v = version(started.snapshot, "a")
    fired = accepted(started.snapshot, TimerFired(TimerKind.PIPELINE_TIMEOUT), NOW + 60_000)
    assert fired.snapshot.state is PipelineState.REVOKED
    assert state(fired.snapshot, "a") is REVOKED and state(fired.snapshot, "b") is None
    assert cancels(fired) == [CancelTasks("a", v, "the pipeline timed out")]

    finished = complete(complete(started.snapshot, "a"), "b")
    late = accepted(finished, TimerFired(TimerKind.PIPELINE_TIMEOUT), NOW + 60_000)
    assert (late.changed, late.snapshot.state) == (False, PipelineState.FINISHED)


def sibling_tree() -> dict[str, Any]:
    """start -> pg -> [s (sa), k] -> cg -> end."""
    start, pg, cg = EmptyStartEvent(id="start"), ParallelGateway(id="pg"), ConvergeGateway(id="cg")
    start.extend(pg).connect(subprocess("s", work("sa")), work("k")).to(pg).converge(cg).extend(EmptyEndEvent())
    return build_tree(start)


@pytest.mark.parametrize("order", ["sibling_first", "revoke_first"])
def test_revoking_a_subprocess_leaves_the_pipeline_in_the_same_state_whatever_the_order(order: str) -> None:
    """Once the revoked branch is the only thing left, nothing can progress: the pipeline must not stay RUNNING."""
    snapshot = begin(sibling_tree()).snapshot
    if order == "sibling_first":
        snapshot = accepted(complete(snapshot, "k"), RevokePipeline(scope="s")).snapshot
    else:
        snapshot = complete(accepted(snapshot, RevokePipeline(scope="s")).snapshot, "k")
    assert (state(snapshot, "s"), state(snapshot, "k")) == (REVOKED, FINISHED)
    assert not any(run.state is RUNNING for run in snapshot.nodes.values())
    assert snapshot.state is PipelineState.FAILED


@pytest.mark.parametrize("operation", ["retry_node", "skip_node"])
def test_a_failed_node_inside_a_revoked_subprocess_cannot_be_brought_back(operation: str) -> None:
    snapshot = begin(sibling_tree()).snapshot
    snapshot = fail(snapshot, "sa")
    assert (state(snapshot, "s"), snapshot.state) == (FAILED, PipelineState.RUNNING)  # k still runs
    snapshot = accepted(snapshot, RevokePipeline(scope="s")).snapshot
    assert state(snapshot, "s") is REVOKED
    kind, message = rejected(snapshot, OPERATIONS[operation](snapshot, "sa"))
    assert (kind, "REVOKED" in message) == ("failed_precondition", True), message


def test_a_paused_subprocess_with_a_running_task_keeps_the_pipeline_from_failing() -> None:
    """A failure elsewhere must not fail the pipeline while work is still running (DESIGN §3): the task's result
    would be refused and the task lost."""
    snapshot = begin(sibling_tree()).snapshot
    snapshot = accepted(snapshot, PausePipeline(scope="s")).snapshot
    snapshot = fail(snapshot, "k")
    assert (state(snapshot, "k"), state(snapshot, "s"), state(snapshot, "sa")) == (FAILED, SUSPENDED, RUNNING)
    assert snapshot.state is PipelineState.RUNNING
    done = accepted(snapshot, TaskCompleted("sa", version(snapshot, "sa")))
    assert state(done.snapshot, "sa") is FINISHED


@pytest.mark.parametrize("operation", ["resume_scope", "revoke_scope"])
def test_a_subprocess_scope_operation_on_a_pause_appointment_does_not_start_or_end_it(operation: str) -> None:
    """The subprocess was appointed to pause but not reached: it must still run normally once the path arrives."""
    snapshot, _ = reach("subprocess", "appointed")
    decision = decide(snapshot, OPERATIONS[operation](snapshot, "s"), NOW)
    assert decision.rejection is not None and "has not been reached" in decision.rejection.message, (
        f"accepted: s is now {state(decision.snapshot, 's')} (started_at={decision.snapshot.nodes['s'].started_at})"
    )


# ---------------------------------------------------------------- 3. invariants under random operations


def machine_tree() -> dict[str, Any]:
    """start -> pg -> [a1 (5 s timeout, then skip), s (sa, one auto retry)] -> cg -> eg -> b1 | b2 -> cge -> end.

    eg takes b1 or b2 by ${pick}, a1's output `pick` (0 by default: no branch, eg fails).
    """
    start, pg, cg = EmptyStartEvent(id="start"), ParallelGateway(id="pg"), ConvergeGateway(id="cg")
    a1 = work("a1", timeout_config={"enable": True, "seconds": 5, "action": "forced_fail_and_skip"})
    sub = subprocess("s", work("sa", auto_retry={"enable": True, "times": 1, "interval": 0}))
    eg = ExclusiveGateway({0: "${pick} == 1", 1: "${pick} == 2"}, id="eg")
    eg.connect(work("b1"), work("b2")).to(eg).converge(ConvergeGateway(id="cge")).extend(EmptyEndEvent(id="end"))
    start.extend(pg).connect(a1, sub).to(pg).converge(cg).extend(eg)
    variables = data()
    variables.inputs["${pick}"] = NodeOutput(source_act="a1", source_key="pick", type=Var.PLAIN, value=0)
    return build_tree(start, data=variables)


MACHINE_TREE = machine_tree()
MACHINE_NODES = ["a1", "s", "s_start", "sa", "cg", "eg", "b1", "b2", "end", "nope"]
NODE_OPERATIONS = sorted(set(OPERATIONS) - {"pause_scope", "resume_scope", "revoke_scope"})


@dataclass
class Ledger:
    """What the server would track from the commands: live task offers and started timers."""

    live: dict[tuple[str, str], int]
    timers: list[StartTimer]


class ControlMachine(RuleBasedStateMachine):
    """Random operations and task results: versions stay unique, no attempt finishes twice, no task is lost."""

    def __init__(self) -> None:
        super().__init__()
        decision = begin(MACHINE_TREE)
        self.snapshot = decision.snapshot
        self.versions: set[str] = set()
        self.old_versions: list[tuple[str, str]] = []
        self.finished: set[tuple[str, str]] = set()
        self.ledger = Ledger({}, [])
        self.record(Snapshot("p1", self.snapshot.spec, PipelineState.RUNNING, {}, {}), decision)

    def record(self, before: Snapshot, decision: Decision) -> None:
        for run in (*decision.histories, *decision.snapshot.nodes.values()):
            old = before.nodes.get(run.node_id)
            if old is not None and old.version == run.version:
                continue
            if (run.node_id, run.version) not in self.old_versions:
                assert run.version not in self.versions, f"version {run.version} reused for {run.node_id}"
                self.versions.add(run.version)
                self.old_versions.append((run.node_id, run.version))
        for change in decision.changes:
            if change.node_id and change.new_state == "FINISHED":
                key = (change.node_id, change.version)
                assert key not in self.finished, f"{key} finished twice"
                self.finished.add(key)
        for command in decision.commands:
            if isinstance(command, OfferTask):
                key = (command.node_id, command.version)
                self.ledger.live[key] = self.ledger.live.get(key, 0) + 1
            elif isinstance(command, CancelTasks):
                self.ledger.live.pop((command.node_id, command.version), None)
            else:
                self.ledger.timers.append(command)

    def apply(self, event: Event) -> Decision:
        decision = decide(self.snapshot, event, NOW)  # never raises: a rejection is the only "no"
        if decision.rejection is not None:
            assert decision.rejection.kind in ("failed_precondition", "not_found", "invalid_argument")
            assert decision.snapshot is self.snapshot
            return decision
        if not decision.changed:
            assert decision.commands == ()
        self.record(self.snapshot, decision)
        self.snapshot = decision.snapshot
        return decision

    def live_offers(self) -> list[tuple[str, str]]:
        return sorted(key for key, count in self.ledger.live.items() if count > 0)

    def report(self, key: tuple[str, str], event: Event) -> None:
        """A worker holding the live offer `key` reports; the offer is used up if the report is taken."""
        rejection = self.apply(event).rejection
        assert rejection is None, f"the engine refused the result of a task it offered: {rejection}"
        self.ledger.live[key] -= 1

    @precondition(lambda self: self.live_offers())
    @rule(data=st.data(), pick=st.sampled_from([0, 1, 2]), mode=st.sampled_from(["done", "poll", "await"]))
    def worker_completes(self, data: st.DataObject, pick: int, mode: str) -> None:
        node_id, v = data.draw(st.sampled_from(self.live_offers()))
        self.report(
            (node_id, v), TaskCompleted(node_id, v, {"pick": pick}, 10 if mode == "poll" else 0, mode == "await")
        )

    @precondition(lambda self: self.live_offers())
    @rule(data=st.data(), retryable=st.booleans())
    def worker_fails(self, data: st.DataObject, retryable: bool) -> None:
        node_id, v = data.draw(st.sampled_from(self.live_offers()))
        self.report((node_id, v), TaskFailed(node_id, v, "boom", {"pick": 0}, retryable, 0, 1))

    @precondition(lambda self: self.old_versions)
    @rule(data=st.data())
    def result_for_an_old_attempt(self, data: st.DataObject) -> None:
        node_id, v = data.draw(st.sampled_from(self.old_versions))
        run = self.snapshot.nodes.get(node_id)
        if run is not None and run.version == v:
            return
        assert self.apply(TaskCompleted(node_id, v)).rejection is not None

    @rule(node_id=st.sampled_from(MACHINE_NODES), current=st.booleans(), payload=st.integers(0, 3))
    def callback(self, node_id: str, current: bool, payload: int) -> None:
        run = self.snapshot.nodes.get(node_id)
        v = run.version if run is not None and current else "v0"
        self.apply(Callback(node_id, v, payload))

    @rule(operation=st.sampled_from(NODE_OPERATIONS), node_id=st.sampled_from(MACHINE_NODES))
    def operate_on_a_node(self, operation: str, node_id: str) -> None:
        self.apply(OPERATIONS[operation](self.snapshot, node_id))

    @rule(operation=st.sampled_from(["pause", "resume", "revoke"]), scope=st.sampled_from(["", "", "s", "sa"]))
    def operate_on_a_level(self, operation: str, scope: str) -> None:
        events = {"pause": PausePipeline(scope), "resume": ResumePipeline(scope), "revoke": RevokePipeline(scope)}
        self.apply(events[operation])

    @precondition(lambda self: self.ledger.timers)
    @rule(data=st.data())
    def timer_fires(self, data: st.DataObject) -> None:
        timer = data.draw(st.sampled_from(self.ledger.timers))
        self.apply(TimerFired(timer.kind, timer.node_id, timer.version))

    @invariant()
    def finished_exactly_when_the_end_event_is(self) -> None:
        end_finished = state(self.snapshot, "end") is FINISHED
        assert (self.snapshot.state is PipelineState.FINISHED) == end_finished

    @invariant()
    def every_running_task_node_has_exactly_one_live_offer(self) -> None:
        tree = self.snapshot.spec.tree
        for node_id, node in tree.nodes.items():
            if node.type not in TASK_NODES:
                continue
            run: NodeRun | None = self.snapshot.nodes.get(node_id)
            live = {v: n for (n_id, v), n in self.ledger.live.items() if n_id == node_id and n > 0}
            if run is not None and run.state is RUNNING and not run.awaiting_callback:
                assert live == {run.version: 1}, (node_id, run.version, live)
            else:
                assert live == {}, (node_id, run, live)


# derandomize: the same sequences on every run and machine, so the suite passes or fails the same way everywhere;
# no explain phase: it costs seconds and the shrunk steps already tell the story.
ControlMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[phase for phase in Phase if phase is not Phase.explain],
)
TestControlMachine = ControlMachine.TestCase
