"""Control of running pipelines and every kind of component, end to end with real worker processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from engine_api.engine.v1 import worker_pb2, worker_pb2_grpc
from tests.flows import act
from tests.support.module_engine import Engine, flat_states, module_engine
from tests.support.processes import ServerProcess
from worker_sdk import EngineClient, FailedPrecondition, InvalidArgument, NotFound
from worker_sdk.builder import (
    ConditionalParallelGateway,
    ConvergeGateway,
    EmptyEndEvent,
    EmptyStartEvent,
    ExclusiveGateway,
    ParallelGateway,
    ServiceActivity,
    SubProcess,
    build_tree,
)

CODES = ["emit", "sleep", "maybe_fail", "flaky", "poller", "callback", "boom", "on_failure"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    yield from module_engine(request, tmp_path_factory, CODES)


def chain(*nodes: Any) -> dict[str, Any]:
    start = EmptyStartEvent()
    tail: Any = start
    for node in nodes:
        tail = tail.extend(node)
    tail.extend(EmptyEndEvent())
    return build_tree(start)


def start(engine: Engine, tree: dict[str, Any], **options: Any) -> str:
    return engine.client.start(tree, **options)


# ---------------------------------------------------------------- retry


def test_retry_with_new_inputs_keeps_the_failed_attempt_in_history(engine: Engine) -> None:
    failing, after = act("maybe_fail", fail=True, value=1), act(step="after")
    pipeline_id, state = engine.run(chain(failing, after))
    assert state["state"] == "FAILED"
    old_version = state["children"][failing.id]["version"]
    assert engine.client.retry_node(pipeline_id, failing.id, {"fail": False, "value": 2}) is True
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    node = state["children"][failing.id]
    assert (node["retry"], node["state"]) == (1, "FINISHED") and node["version"] != old_version
    [history] = engine.client.get_node_histories(pipeline_id, failing.id)
    assert (history["version"], history["state"]) == (old_version, "FAILED")
    assert history["inputs"]["fail"] is True and history["outputs"]["ex_data"].startswith("ValueError")
    assert engine.outputs(pipeline_id, failing.id)["value"] == 2


def test_ten_failed_nodes_in_a_subprocess_under_nested_parallel_gateways_are_retried(engine: Engine) -> None:
    child_start, child_end = EmptyStartEvent(), EmptyEndEvent()
    outer, outer_join = ParallelGateway(), ConvergeGateway()
    inner, inner_join = ParallelGateway(), ConvergeGateway()
    failing = [act("maybe_fail", fail=True, value=i) for i in range(10)]
    inner.connect(*failing[:5]).to(inner).converge(inner_join)
    child_start.extend(outer).connect(inner, *failing[5:]).to(outer).converge(outer_join).extend(child_end)
    sub = SubProcess(start=child_start)
    tree = chain(sub, act(step="after"))
    pipeline_id = start(engine, tree)
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FAILED"
    states = flat_states(state)
    assert [states[n.id] for n in failing] == ["FAILED"] * 10 and states[sub.id] == "FAILED"
    for node in failing:
        engine.client.retry_node(pipeline_id, node.id, {"fail": False, "value": "fixed"})
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    for node in failing:
        assert engine.outputs(pipeline_id, node.id)["value"] == "fixed"
        assert len(engine.client.get_node_histories(pipeline_id, node.id)) == 1


def test_retry_subprocess_that_fails_again_gets_a_new_version_and_one_history_row(engine: Engine) -> None:
    child = EmptyStartEvent()
    child.extend(act("boom")).extend(EmptyEndEvent())
    sub = SubProcess(start=child)
    pipeline_id, state = engine.run(chain(sub))
    first_version = state["children"][sub.id]["version"]
    assert engine.client.retry_subprocess(pipeline_id, sub.id) is True
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FAILED" and state["children"][sub.id]["state"] == "FAILED"
    assert state["children"][sub.id]["version"] != first_version
    assert [h["version"] for h in engine.client.get_node_histories(pipeline_id, sub.id)] == [first_version]


def test_auto_retry_succeeds_on_the_third_attempt(engine: Engine) -> None:
    node = ServiceActivity(component_code="flaky", auto_retry={"enable": True, "times": 3, "interval": 0})
    pipeline_id, state = engine.run(chain(node))
    assert state["state"] == "FINISHED"
    assert state["children"][node.id]["retry"] == 2
    assert engine.outputs(pipeline_id, node.id)["retry"] == 2
    assert [h["state"] for h in engine.client.get_node_histories(pipeline_id, node.id)] == ["FAILED", "FAILED"]


# ---------------------------------------------------------------- revoke


def test_revoke_nested_parallel_branches_while_long_tasks_run(engine: Engine) -> None:
    outer, outer_join, inner, inner_join = ParallelGateway(), ConvergeGateway(), ParallelGateway(), ConvergeGateway()
    sleepers = [act("sleep", seconds=30) for _ in range(4)]
    downstream = act(step="never")
    inner.connect(*sleepers[:2]).to(inner).converge(inner_join)
    root = EmptyStartEvent()
    root.extend(outer).connect(inner, *sleepers[2:]).to(outer).converge(outer_join).extend(downstream).extend(
        EmptyEndEvent()
    )
    pipeline_id = start(engine, build_tree(root))
    engine.wait_for(lambda: len([e for e in engine.executions(pipeline_id) if e.get("event") == "started"]) == 4)
    assert engine.client.revoke_pipeline(pipeline_id) is True
    state = engine.client.get_state(pipeline_id)
    states = flat_states(state)
    assert state["state"] == "REVOKED"
    assert [states[s.id] for s in sleepers] == ["REVOKED"] * 4
    assert downstream.id not in states
    # Each worker learned through its heartbeat that its task was cancelled.
    engine.wait_for(
        lambda: len([e for e in engine.executions(pipeline_id) if e.get("event") == "cancelled"]) == 4,
        timeout=30,
        what="the workers to see cancel_requested",
    )
    assert engine.client.revoke_pipeline(pipeline_id) is False  # already revoked: nothing changes


# ---------------------------------------------------------------- skip


def test_skip_a_failed_node_in_a_simple_pipeline(engine: Engine) -> None:
    failing, after = act("boom"), act(step="after")
    pipeline_id, state = engine.run(chain(failing, after))
    assert engine.client.skip_node(pipeline_id, failing.id) is True
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    node = state["children"][failing.id]
    assert (node["state"], node["skip"]) == ("FINISHED", True)


def test_skip_inside_a_subprocess_with_parallel_branches(engine: Engine) -> None:
    child, fork, join = EmptyStartEvent(), ParallelGateway(), ConvergeGateway()
    failing, fine = act("boom"), act(step="fine")
    child.extend(fork).connect(failing, fine).to(fork).converge(join).extend(EmptyEndEvent())
    sub = SubProcess(start=child)
    pipeline_id, state = engine.run(chain(sub, act(step="after")))
    assert state["state"] == "FAILED"
    engine.client.skip_node(pipeline_id, failing.id)
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    assert flat_states(state)[sub.id] == "FINISHED"


def test_skip_an_exclusive_gateway_whose_conditions_all_failed_onto_a_chosen_flow(engine: Engine) -> None:
    root, gateway, join = EmptyStartEvent(), ExclusiveGateway({0: "1 == 2", 1: "2 == 3"}), ConvergeGateway()
    left, right = act(side="left"), act(side="right")
    root.extend(gateway).connect(left, right).to(gateway).converge(join).extend(EmptyEndEvent())
    tree = build_tree(root)
    pipeline_id, state = engine.run(tree)
    assert state["children"][gateway.id]["state"] == "FAILED"
    flow_to_right = next(f for f in tree["flows"].values() if f["target"] == right.id)["id"]
    with pytest.raises(InvalidArgument, match="outgoing flows"):
        engine.client.skip_exclusive_gateway(pipeline_id, gateway.id, "no-such-flow")
    engine.client.skip_exclusive_gateway(pipeline_id, gateway.id, flow_to_right)
    state = engine.client.wait(pipeline_id, timeout=30)
    states = flat_states(state)
    assert state["state"] == "FINISHED"
    assert states[right.id] == "FINISHED" and left.id not in states
    assert state["children"][gateway.id]["skip"] is True


def test_skip_a_conditional_parallel_gateway(engine: Engine) -> None:
    root, gateway, join = (
        EmptyStartEvent(),
        ConditionalParallelGateway({0: "1 == 2", 1: "1 == 2", 2: "1 == 2"}),
        ConvergeGateway(),
    )
    branches = [act(branch=i) for i in range(3)]
    root.extend(gateway).connect(*branches).to(gateway).converge(join).extend(EmptyEndEvent())
    tree = build_tree(root)
    pipeline_id, state = engine.run(tree)
    assert state["children"][gateway.id]["state"] == "FAILED"
    flows = {f["target"]: f["id"] for f in tree["flows"].values() if f["source"] == gateway.id}
    engine.client.skip_conditional_parallel_gateway(
        pipeline_id, gateway.id, [flows[branches[0].id], flows[branches[2].id]]
    )
    state = engine.client.wait(pipeline_id, timeout=30)
    states = flat_states(state)
    assert state["state"] == "FINISHED"
    assert [states.get(b.id) for b in branches] == ["FINISHED", None, "FINISHED"]


# ---------------------------------------------------------------- component kinds


def test_a_polling_component_finishes_after_five_polls(engine: Engine) -> None:
    node = act("poller", polls=5, interval_ms=20)
    pipeline_id, state = engine.run(chain(node))
    assert state["state"] == "FINISHED"
    assert state["children"][node.id]["schedule_times"] == 5
    assert engine.outputs(pipeline_id, node.id)["polls"] == 5


def test_callback_success(engine: Engine) -> None:
    node = act("callback", needed=1)
    pipeline_id = start(engine, chain(node))
    running = engine.wait_node(pipeline_id, node.id, "RUNNING")
    engine.wait_for(lambda: engine.executions(pipeline_id), what="the worker to ask for a callback")
    time.sleep(0.2)
    assert engine.client.callback(pipeline_id, node.id, running["version"], {"ok": True}) is True
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    assert engine.outputs(pipeline_id, node.id)["received"] == [{"ok": True}]


def await_callback_ready(engine: Engine, pipeline_id: str, node_id: str, schedules: int) -> str:
    """Waits until the worker has handled `schedules` callbacks and asked for the next; returns the version."""
    engine.wait_for(
        lambda: len([e for e in engine.executions(pipeline_id) if e["node_id"] == node_id]) >= schedules + 1,
        what="the worker to handle earlier callbacks",
    )
    time.sleep(0.2)
    node = engine.node(pipeline_id, node_id)
    assert node is not None
    return str(node["version"])


def test_multi_callback_needs_five_callbacks(engine: Engine) -> None:
    node = act("callback", needed=5)
    pipeline_id = start(engine, chain(node))
    version = await_callback_ready(engine, pipeline_id, node.id, 0)
    for i in range(3):
        engine.client.callback(pipeline_id, node.id, version, {"n": i})
        await_callback_ready(engine, pipeline_id, node.id, i + 1)
    node_state = engine.node(pipeline_id, node.id)
    assert node_state is not None and (node_state["state"], node_state["schedule_times"]) == ("RUNNING", 3)
    for i in range(3, 5):  # sent back to back: the engine queues the one the worker is not ready for
        engine.client.callback(pipeline_id, node.id, version, {"n": i})
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    assert engine.outputs(pipeline_id, node.id)["received"] == [{"n": i} for i in range(5)]


def test_a_failed_callback_then_retry_then_callbacks_with_the_new_version(engine: Engine) -> None:
    node = act("callback", needed=1)
    pipeline_id = start(engine, chain(node))
    old_version = await_callback_ready(engine, pipeline_id, node.id, 0)
    engine.client.callback(pipeline_id, node.id, old_version, {"fail": "upstream said no"})
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FAILED"
    assert "upstream said no" in engine.client.get_node_data(pipeline_id, node.id)["ex_data"]
    engine.client.retry_node(pipeline_id, node.id)
    new_version = await_callback_ready(engine, pipeline_id, node.id, 1)
    assert new_version != old_version
    with pytest.raises(FailedPrecondition, match="older attempt"):
        engine.client.callback(pipeline_id, node.id, old_version, {"late": True})
    engine.client.callback(pipeline_id, node.id, new_version, {"ok": True})
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"


def test_a_callback_node_failed_and_then_skipped(engine: Engine) -> None:
    node, after = act("callback", needed=1), act(step="after")
    pipeline_id = start(engine, chain(node, after))
    version = await_callback_ready(engine, pipeline_id, node.id, 0)
    engine.client.callback(pipeline_id, node.id, version, {"fail": "no"})
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FAILED"
    engine.client.skip_node(pipeline_id, node.id)
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED" and state["children"][node.id]["skip"] is True


# ---------------------------------------------------------------- force-fail


@pytest.mark.parametrize("kind", ["polling", "long one-shot", "awaiting callback"])
def test_force_fail_then_skip(engine: Engine, kind: str) -> None:
    node = {
        "polling": act("poller", polls=10_000, interval_ms=50),
        "long one-shot": act("sleep", seconds=30),
        "awaiting callback": act("callback", needed=1),
    }[kind]
    after = act(step="after")
    pipeline_id = start(engine, chain(node, after))
    engine.wait_for(lambda: engine.executions(pipeline_id), what="the task to start")
    assert engine.client.force_fail(pipeline_id, node.id, "operator gave up") is True
    data_ = engine.client.get_node_data(pipeline_id, node.id)
    assert (data_["state"], data_["ex_data"], data_["outputs"]["_forced_failed"]) == (
        "FAILED",
        "operator gave up",
        True,
    )
    assert engine.client.get_state(pipeline_id)["state"] == "FAILED"
    if kind == "long one-shot":  # the worker is told to cancel; whatever it reports later changes nothing
        engine.wait_for(lambda: any(e.get("event") == "cancelled" for e in engine.executions(pipeline_id)), timeout=30)
        assert engine.client.get_node_data(pipeline_id, node.id)["state"] == "FAILED"
    engine.client.skip_node(pipeline_id, node.id)
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    assert state["children"][after.id]["state"] == "FINISHED"


def test_a_late_completion_after_force_fail_is_refused_and_changes_nothing(engine: Engine) -> None:
    node = act("manual_task")
    pipeline_id = start(engine, chain(node))
    with grpc.insecure_channel(engine.server.address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        request = worker_pb2.PollTasksRequest(worker_id="t", component_codes=["manual_task"], max_tasks=1, wait_ms=5000)
        [task] = worker.PollTasks(request).tasks
        engine.client.force_fail(pipeline_id, node.id)
        reply = worker.Heartbeat(worker_pb2.HeartbeatRequest(token=task.token))
        assert reply.cancel_requested is True
        with pytest.raises(grpc.RpcError) as refused:
            worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token, outputs_json='{"late": true}'))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    data_ = engine.client.get_node_data(pipeline_id, node.id)
    assert data_["state"] == "FAILED" and "late" not in data_["outputs"]


# ---------------------------------------------------------------- pause


def test_pause_node_in_a_chain_stops_the_path_there_until_resumed(engine: Engine) -> None:
    first, second, third = act("sleep", seconds=0.3), act(step=2), act(step=3)
    pipeline_id = start(engine, chain(first, second, third))
    assert engine.client.pause_node(pipeline_id, second.id) is True
    assert engine.node(pipeline_id, second.id)["state"] == "SUSPENDED"  # type: ignore[index]
    engine.wait_node(pipeline_id, first.id, "FINISHED")
    time.sleep(0.3)
    state = engine.client.get_state(pipeline_id)
    assert state["state"] == "RUNNING" and state["children"][second.id]["state"] == "SUSPENDED"
    assert third.id not in state["children"]
    assert engine.client.resume_node(pipeline_id, second.id) is True
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"


def test_resume_node_before_it_is_reached(engine: Engine) -> None:
    first, second = act("sleep", seconds=0.5), act(step=2)
    pipeline_id = start(engine, chain(first, second))
    engine.client.pause_node(pipeline_id, second.id)
    engine.client.resume_node(pipeline_id, second.id)
    assert second.id not in engine.client.get_state(pipeline_id)["children"]  # no state again
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED" and state["children"][second.id]["loop"] == 1


def test_pause_four_nodes_across_nested_parallel_branches(engine: Engine) -> None:
    outer, outer_join, inner, inner_join = ParallelGateway(), ConvergeGateway(), ParallelGateway(), ConvergeGateway()
    paused = [act(step=f"paused {i}") for i in range(4)]
    free = [act(step="free 1"), act(step="free 2")]
    inner.connect(paused[0], paused[1], free[0]).to(inner).converge(inner_join)
    root = EmptyStartEvent()
    gate = act("sleep", seconds=0.5)
    root.extend(gate).extend(outer).connect(inner, paused[2], paused[3], free[1]).to(outer).converge(outer_join).extend(
        EmptyEndEvent()
    )
    pipeline_id = start(engine, build_tree(root))
    for node in paused:
        engine.client.pause_node(pipeline_id, node.id)
    engine.wait_node(pipeline_id, free[0].id, "FINISHED")
    engine.wait_node(pipeline_id, free[1].id, "FINISHED")
    time.sleep(0.3)
    states = flat_states(engine.client.get_state(pipeline_id))
    assert [states[n.id] for n in paused] == ["SUSPENDED"] * 4
    assert inner_join.id not in states and outer_join.id not in states  # the converges wait
    for node in paused:
        engine.client.resume_node(pipeline_id, node.id)
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"


def test_pause_a_node_inside_a_subprocess_inside_a_parallel_branch_inside_a_subprocess(engine: Engine) -> None:
    deep = act(step="deep")
    inner_start = EmptyStartEvent()
    inner_start.extend(act("sleep", seconds=0.3)).extend(deep).extend(EmptyEndEvent())
    inner_sub = SubProcess(start=inner_start)
    outer_start, fork, join = EmptyStartEvent(), ParallelGateway(), ConvergeGateway()
    outer_start.extend(fork).connect(inner_sub, act(step="side")).to(fork).converge(join).extend(EmptyEndEvent())
    outer_sub = SubProcess(start=outer_start)
    pipeline_id = start(engine, chain(outer_sub))
    engine.client.pause_node(pipeline_id, deep.id)
    time.sleep(1.0)
    states = flat_states(engine.client.get_state(pipeline_id))
    assert states[deep.id] == "SUSPENDED" and states[inner_sub.id] == "RUNNING"
    engine.client.resume_node(pipeline_id, deep.id)
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"


def test_pause_and_resume_a_pipeline_with_nested_parallel_branches(engine: Engine) -> None:
    outer, outer_join, inner, inner_join = ParallelGateway(), ConvergeGateway(), ParallelGateway(), ConvergeGateway()
    running = [act("sleep", seconds=0.5) for _ in range(3)]
    following = [act(step=f"next {i}") for i in range(3)]
    for node, after in zip(running, following, strict=True):
        node.extend(after)
    inner.connect(running[0], running[1]).to(inner).converge(inner_join)
    root = EmptyStartEvent()
    root.extend(outer).connect(inner, running[2]).to(outer).converge(outer_join).extend(EmptyEndEvent())
    pipeline_id = start(engine, build_tree(root))
    engine.wait_for(lambda: len([e for e in engine.executions(pipeline_id) if e.get("event") == "started"]) == 3)
    assert engine.client.pause_pipeline(pipeline_id) is True
    assert engine.client.pause_pipeline(pipeline_id) is False  # already paused
    for node in running:  # running tasks finish
        engine.wait_node(pipeline_id, node.id, "FINISHED")
    time.sleep(0.3)
    state = engine.client.get_state(pipeline_id)
    states = flat_states(state)
    assert state["state"] == "SUSPENDED"
    assert not any(n.id in states for n in following)  # the next nodes have no state while SUSPENDED
    assert engine.client.resume_pipeline(pipeline_id) is True
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"


def test_pause_with_immediate_resume(engine: Engine) -> None:
    pipeline_id = start(engine, chain(act(step=1), act(step=2), act(step=3)))
    engine.client.pause_pipeline(pipeline_id)
    engine.client.resume_pipeline(pipeline_id)
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"


def test_pause_and_resume_a_pipeline_with_subprocesses(engine: Engine) -> None:
    child = EmptyStartEvent()
    inside = act(step="inside")
    child.extend(act("sleep", seconds=0.5)).extend(inside).extend(EmptyEndEvent())
    sub = SubProcess(start=child)
    pipeline_id = start(engine, chain(sub, act(step="after")))
    engine.wait_for(lambda: engine.executions(pipeline_id))
    engine.client.pause_pipeline(pipeline_id)
    time.sleep(1.0)
    states = flat_states(engine.client.get_state(pipeline_id))
    assert inside.id not in states
    engine.client.resume_pipeline(pipeline_id)
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"


def test_pause_one_of_two_parallel_subprocesses(engine: Engine) -> None:
    def sub(label: str) -> tuple[SubProcess, Any]:
        child = EmptyStartEvent()
        later = act(step=f"{label} later")
        child.extend(act("sleep", seconds=0.5)).extend(later).extend(EmptyEndEvent())
        return SubProcess(start=child), later

    (paused, paused_later), (free, free_later) = sub("paused"), sub("free")
    root, fork, join = EmptyStartEvent(), ParallelGateway(), ConvergeGateway()
    root.extend(fork).connect(paused, free).to(fork).converge(join).extend(EmptyEndEvent())
    pipeline_id = start(engine, build_tree(root))
    engine.wait_node(pipeline_id, paused.id, "RUNNING")
    assert engine.client.pause_pipeline(pipeline_id, subprocess_id=paused.id) is True
    engine.wait_node(pipeline_id, free.id, "FINISHED")
    time.sleep(0.3)
    state = engine.client.get_state(pipeline_id)
    states = flat_states(state)
    assert state["state"] == "RUNNING"
    assert states[paused.id] == "SUSPENDED" and paused_later.id not in states
    assert states[free_later.id] == "FINISHED"
    engine.client.resume_pipeline(pipeline_id, subprocess_id=paused.id)
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"


# ---------------------------------------------------------------- timeouts and starting elsewhere


@pytest.mark.parametrize(
    ("action", "pipeline_state"), [("forced_fail", "FAILED"), ("forced_fail_and_skip", "FINISHED")]
)
def test_node_timeout_with_each_action(engine: Engine, action: str, pipeline_state: str) -> None:
    node = ServiceActivity(component_code="sleep", timeout_config={"enable": True, "seconds": 1, "action": action})
    node.component.inputs.seconds = __import__("worker_sdk").Var(type="plain", value=30)
    pipeline_id, state = engine.run(chain(node, act(step="after")))
    assert state["state"] == pipeline_state
    data_ = engine.client.get_node_data(pipeline_id, node.id)
    assert "timed out after 1 s" in data_["outputs"]["ex_data"]
    assert state["children"][node.id]["skip"] is (action == "forced_fail_and_skip")


def test_a_pipeline_timeout_revokes_it(engine: Engine) -> None:
    node = act("sleep", seconds=30)
    pipeline_id = engine.client.start(chain(node), timeout_ms=1000)
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "REVOKED"
    assert state["children"][node.id]["state"] == "REVOKED"


def test_start_node_id_and_error_ignorable(engine: Engine) -> None:
    skipped, ignored, last = act(step=1), ServiceActivity(component_code="boom", error_ignorable=True), act(step=3)
    tree = chain(skipped, ignored, last)
    pipeline_id = engine.client.start(tree, start_node_id=ignored.id)
    state = engine.client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    assert skipped.id not in state["children"]
    assert state["children"][ignored.id]["error_ignored"] is True


def test_the_failure_handler_runs_once_when_the_pipeline_fails(engine: Engine) -> None:
    failing = act("maybe_fail", fail=True)
    pipeline_id = engine.client.start(chain(failing), failure_handler="on_failure")
    engine.wait_for(lambda: (engine.client.get_state(pipeline_id)["failure_handler"] or {}).get("state") == "FINISHED")
    state = engine.client.get_state(pipeline_id)
    assert state["state"] == "FAILED"
    assert state["failure_handler"]["outputs"]["alerted"] == [failing.id]
    [run] = [e for e in engine.executions(pipeline_id) if "failed_nodes" in e]
    assert run["failed_nodes"][0]["ex_data"].startswith("ValueError: asked to fail")
    engine.client.retry_node(pipeline_id, failing.id)  # fails again: the handler does not run twice
    engine.wait_for(lambda: engine.client.get_state(pipeline_id)["children"][failing.id]["retry"] == 1)
    assert engine.client.wait(pipeline_id, timeout=30)["state"] == "FAILED"
    time.sleep(0.5)
    assert len([e for e in engine.executions(pipeline_id) if "failed_nodes" in e]) == 1


# ---------------------------------------------------------------- watch and errors


def test_watch_starts_with_the_current_state_and_follows_until_the_end(engine: Engine) -> None:
    gate, after = act("callback", needed=1), act(step="after")
    pipeline_id = start(engine, chain(gate, after))
    version = await_callback_ready(engine, pipeline_id, gate.id, 0)
    stream = engine.client.watch(pipeline_id)
    initial = [next(stream) for _ in range(3)]  # the current state: start, the waiting node, the pipeline
    assert [(c["node_id"], c["new_state"]) for c in initial] == [
        (initial[0]["node_id"], "FINISHED"),
        (gate.id, "RUNNING"),
        (None, "RUNNING"),  # None: the pipeline itself
    ]
    engine.client.callback(pipeline_id, gate.id, version, {"ok": 1})
    changes = list(stream)
    seen = [(c["node_id"], c["new_state"]) for c in changes]
    assert (after.id, "FINISHED") in seen
    assert seen[-1] == (None, "FINISHED")


def test_illegal_operations_say_which_state_the_target_is_in(engine: Engine) -> None:
    node = act(step=1)
    pipeline_id, state = engine.run(chain(node))
    with pytest.raises(FailedPrecondition, match="FINISHED"):
        engine.client.pause_pipeline(pipeline_id)
    with pytest.raises(FailedPrecondition, match="is FINISHED"):
        engine.client.retry_node(pipeline_id, node.id)
    with pytest.raises(FailedPrecondition, match="is FINISHED"):
        engine.client.skip_node(pipeline_id, node.id)
    with pytest.raises(NotFound, match="no node 'ghost'"):
        engine.client.force_fail(pipeline_id, "ghost")
    with pytest.raises(NotFound, match="does not exist"):
        engine.client.pause_pipeline("no-such-pipeline")


def test_timers_fire_after_a_server_restart(server: ServerProcess, start_worker: Any) -> None:
    start_worker("sleep")
    node = ServiceActivity(
        component_code="sleep", timeout_config={"enable": True, "seconds": 2, "action": "forced_fail"}
    )
    node.component.inputs.seconds = __import__("worker_sdk").Var(type="plain", value=30)
    with EngineClient(server.address) as client:
        pipeline_id = client.start(chain(node))
        time.sleep(0.5)
        server.kill()
        server.start()
        state = client.wait(pipeline_id, timeout=30)
        assert state["state"] == "FAILED"
        assert "timed out after 2 s" in client.get_node_data(pipeline_id, node.id)["ex_data"]


def test_a_paused_pipeline_survives_a_server_restart_and_resumes(server: ServerProcess, start_worker: Any) -> None:
    start_worker("sleep", "emit")
    first, second = act("sleep", seconds=0.5), act(step="second")
    with EngineClient(server.address) as client:
        pipeline_id = client.start(chain(first, second))
        client.pause_pipeline(pipeline_id)
        deadline = time.monotonic() + 20
        while client.get_state(pipeline_id)["children"][first.id]["state"] != "FINISHED":
            assert time.monotonic() < deadline, "the running task should finish while the pipeline is paused"
            time.sleep(0.05)
        server.kill()
        server.start()
        state = client.get_state(pipeline_id)
        assert state["state"] == "SUSPENDED" and second.id not in state["children"]
        client.resume_pipeline(pipeline_id)
        assert client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"
