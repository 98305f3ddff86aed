"""The scheduler function: events in, states and commands out. No server, no database, no clock."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine_server.core.decide import (
    Decision,
    OfferTask,
    StartPipeline,
    TaskCompleted,
    TaskFailed,
    TaskKind,
    decide,
)
from engine_server.core.model import NodeState, PipelineState, Snapshot
from engine_server.core.tree import parse_tree
from tests.trees import chain_tree

NOW = 1_700_000_000_000


def new_snapshot(tree: dict[str, Any], inputs: dict[str, Any] | None = None, **options: Any) -> Snapshot:
    spec = parse_tree(tree, cycle_tolerate=options.pop("cycle_tolerate", False))
    presets = {f"${{{key}}}": value for key, value in (inputs or {}).items()}
    return Snapshot("p1", spec, PipelineState.RUNNING, {}, {}, presets=presets, **options)


def started(tree: dict[str, Any], inputs: dict[str, Any] | None = None, **options: Any) -> Decision:
    decision = decide(new_snapshot(tree, inputs, **options), StartPipeline(), NOW)
    assert decision.rejection is None
    return decision


def offers(decision: Decision) -> list[OfferTask]:
    return [c for c in decision.commands if isinstance(c, OfferTask)]


def test_start_finishes_the_start_event_and_offers_the_first_activity_with_rendered_inputs() -> None:
    tree = chain_tree(
        ["echo", "echo"],
        inputs={
            "greeting": {"type": "splice", "value": "hello ${name}"},
            "n": {"type": "splice", "value": "${n}"},
        },
        data_inputs={"${name}": {"type": "plain", "value": "ada"}, "${n}": {"type": "plain", "value": 7}},
    )
    decision = started(tree)
    nodes = decision.snapshot.nodes
    assert nodes["start"].state is NodeState.FINISHED
    assert nodes["a0"].state is NodeState.RUNNING
    assert "a1" not in nodes and "end" not in nodes  # not reached: no state
    [offer] = offers(decision)
    assert (offer.node_id, offer.kind, offer.component_code) == ("a0", TaskKind.EXECUTE, "echo")
    assert offer.inputs == {"greeting": "hello ada", "n": 7, "_loop": 1, "_inner_loop": 1}


def test_completing_the_last_activity_finishes_the_pipeline() -> None:
    decision = started(chain_tree(["echo"]))
    a0 = decision.snapshot.nodes["a0"]
    done = decide(decision.snapshot, TaskCompleted("a0", a0.version, {"y": 2}), NOW + 5)
    assert done.snapshot.state is PipelineState.FINISHED
    assert done.snapshot.nodes["a0"].outputs == {"y": 2, "_result": True}
    assert done.snapshot.nodes["end"].state is NodeState.FINISHED
    assert done.snapshot.finished_at == NOW + 5
    assert offers(done) == []


def test_a_failure_fails_the_node_with_ex_data_and_the_pipeline_and_runs_nothing_after() -> None:
    decision = started(chain_tree(["boom", "echo"]))
    a0 = decision.snapshot.nodes["a0"]
    failed = decide(decision.snapshot, TaskFailed("a0", a0.version, "ValueError: no"), NOW)
    assert failed.snapshot.nodes["a0"].state is NodeState.FAILED
    assert failed.snapshot.nodes["a0"].outputs == {"_result": False, "ex_data": "ValueError: no"}
    assert failed.snapshot.state is PipelineState.FAILED
    assert "a1" not in failed.snapshot.nodes
    assert offers(failed) == []


def test_error_ignorable_failure_finishes_the_node_and_continues() -> None:
    decision = started(chain_tree(["boom", "echo"], node_options={0: {"error_ignorable": True}}))
    a0 = decision.snapshot.nodes["a0"]
    after = decide(decision.snapshot, TaskFailed("a0", a0.version, "oops"), NOW)
    node = after.snapshot.nodes["a0"]
    assert (node.state, node.error_ignored, node.outputs["ex_data"]) == (NodeState.FINISHED, True, "oops")
    assert [o.node_id for o in offers(after)] == ["a1"]


def test_a_retryable_failure_runs_a_new_attempt_and_keeps_the_old_one_in_history() -> None:
    decision = started(chain_tree(["flaky"]))
    a0 = decision.snapshot.nodes["a0"]
    after = decide(
        decision.snapshot,
        TaskFailed("a0", a0.version, "timeout", retryable=True, retry_after_ms=500, transient_retry_budget=1),
        NOW,
    )
    node = after.snapshot.nodes["a0"]
    assert (node.state, node.retry) == (NodeState.RUNNING, 1)
    assert node.version != a0.version
    [history] = after.histories
    assert (history.version, history.state, history.outputs["ex_data"]) == (
        a0.version,
        NodeState.FAILED,
        "timeout",
    )
    [offer] = offers(after)
    assert offer.available_at == NOW + 500
    # The budget is spent: the next failure fails the node.
    again = decide(
        after.snapshot,
        TaskFailed("a0", node.version, "timeout", retryable=True, transient_retry_budget=1),
        NOW,
    )
    assert again.snapshot.nodes["a0"].state is NodeState.FAILED


def test_polling_keeps_the_node_running_and_offers_a_schedule_task_later() -> None:
    decision = started(chain_tree(["poller"]))
    a0 = decision.snapshot.nodes["a0"]
    after = decide(decision.snapshot, TaskCompleted("a0", a0.version, {"progress": 1}, poll_after_ms=200), NOW)
    node = after.snapshot.nodes["a0"]
    assert (node.state, node.schedule_times, node.outputs) == (NodeState.RUNNING, 1, {"progress": 1})
    [offer] = offers(after)
    assert (offer.kind, offer.available_at, offer.outputs) == (TaskKind.SCHEDULE, NOW + 200, {"progress": 1})


@pytest.mark.parametrize(
    ("event", "kind", "fragment"),
    [
        (lambda v: TaskCompleted("a0", "v999"), "failed_precondition", "older attempt"),
        (lambda v: TaskCompleted("a1", v), "not_found", "'a1' has not run"),
        (lambda v: TaskFailed("a0", "v999", "x"), "failed_precondition", "older attempt"),
    ],
)
def test_results_for_the_wrong_attempt_are_rejected_with_a_reason(event: Any, kind: str, fragment: str) -> None:
    decision = started(chain_tree(["echo", "echo"]))
    result = decide(decision.snapshot, event(decision.snapshot.nodes["a0"].version), NOW)
    assert result.rejection is not None
    assert result.rejection.kind == kind
    assert fragment in result.rejection.message
    assert result.snapshot is decision.snapshot  # nothing changed


def test_a_finished_node_takes_no_second_result() -> None:
    decision = started(chain_tree(["echo", "echo"]))
    version = decision.snapshot.nodes["a0"].version
    once = decide(decision.snapshot, TaskCompleted("a0", version), NOW)
    twice = decide(once.snapshot, TaskCompleted("a0", version), NOW)
    assert twice.rejection is not None and "FINISHED" in twice.rejection.message


def test_start_node_id_begins_the_pipeline_there() -> None:
    decision = decide(new_snapshot(chain_tree(["a", "b", "c"])), StartPipeline(start_node_id="a1"), NOW)
    assert set(decision.snapshot.nodes) == {"a1"}
    assert [o.component_code for o in offers(decision)] == ["b"]


def test_starting_twice_is_rejected() -> None:
    decision = started(chain_tree(["a"]))
    again = decide(decision.snapshot, StartPipeline(), NOW)
    assert again.rejection is not None and again.rejection.kind == "failed_precondition"


class ChainMachine(RuleBasedStateMachine):
    """Random results against a chain: versions are never reused, no node finishes twice, no task is lost."""

    def __init__(self) -> None:
        super().__init__()
        tree = chain_tree(["c"] * 6, node_options={2: {"error_ignorable": True}})
        self.snapshot = started(tree).snapshot
        self.versions_seen: set[str] = {run.version for run in self.snapshot.nodes.values()}
        self.finish_count: dict[str, int] = {}

    def running(self) -> list[str]:
        return [n for n, run in self.snapshot.nodes.items() if run.state is NodeState.RUNNING]

    def apply(self, decision: Decision) -> None:
        if decision.rejection is not None:
            assert decision.snapshot is self.snapshot
            return
        for node_id in decision.changed_node_ids:
            run = decision.snapshot.nodes[node_id]
            old = self.snapshot.nodes.get(node_id)
            if old is None or old.version != run.version:
                assert run.version not in self.versions_seen, "a version was reused"
                self.versions_seen.add(run.version)
            if run.state is NodeState.FINISHED and (old is None or old.state is not NodeState.FINISHED):
                self.finish_count[node_id] = self.finish_count.get(node_id, 0) + 1
        self.snapshot = decision.snapshot

    @rule(outputs=st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), poll=st.booleans())
    def complete(self, outputs: dict[str, int], poll: bool) -> None:
        for node_id in self.running():
            run = self.snapshot.nodes[node_id]
            self.apply(decide(self.snapshot, TaskCompleted(node_id, run.version, outputs, 10 if poll else 0), NOW))

    @rule(retryable=st.booleans())
    def fail(self, retryable: bool) -> None:
        for node_id in self.running():
            run = self.snapshot.nodes[node_id]
            self.apply(decide(self.snapshot, TaskFailed(node_id, run.version, "x", {}, retryable, 0, 2), NOW))

    @rule(stale=st.integers(min_value=0, max_value=50))
    def stale_result(self, stale: int) -> None:
        for node_id in self.running():
            decision = decide(self.snapshot, TaskCompleted(node_id, f"v{stale}"), NOW)
            if decision.rejection is None:
                assert self.snapshot.nodes[node_id].version == f"v{stale}"
            self.apply(decision)

    @invariant()
    def no_node_finishes_twice(self) -> None:
        assert all(count == 1 for count in self.finish_count.values())

    @invariant()
    def a_running_pipeline_always_has_work_offered(self) -> None:
        if self.snapshot.state is PipelineState.RUNNING:
            assert len(self.running()) == 1
        if self.snapshot.state is PipelineState.FINISHED:
            assert self.running() == []
            assert self.snapshot.nodes["end"].state is NodeState.FINISHED


ChainMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestChainMachine = ChainMachine.TestCase


def test_snapshots_are_not_mutated_by_decide() -> None:
    decision = started(chain_tree(["echo"]))
    before = replace(decision.snapshot)
    decide(decision.snapshot, TaskCompleted("a0", decision.snapshot.nodes["a0"].version), NOW)
    assert decision.snapshot == before
