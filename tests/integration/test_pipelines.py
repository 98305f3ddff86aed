"""End to end: a real engine server process, real worker processes, a real SQLite file or PostgreSQL database."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine_api.engine.v1 import worker_pb2, worker_pb2_grpc
from tests.support.processes import ServerProcess
from tests.trees import chain_tree
from worker_sdk import EngineClient, InvalidArgument, NotFound, Unimplemented

FINISHED, FAILED, RUNNING = "FINISHED", "FAILED", "RUNNING"


@pytest.fixture
def client(server: ServerProcess) -> Iterator[EngineClient]:
    with EngineClient(server.address) as engine_client:
        yield engine_client


@pytest.fixture
def record_file(tmp_path: Path) -> Path:
    return tmp_path / "executions.jsonl"


def executions(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_for(condition: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_one_activity_pipeline_finishes_with_rendered_inputs_and_outputs(
    client: EngineClient, start_worker: Any
) -> None:
    start_worker("echo")
    tree = chain_tree(
        ["echo"],
        inputs={"greeting": {"type": "splice", "value": "hello ${name}"}, "count": {"type": "splice", "value": "${n}"}},
        data_inputs={"${name}": {"type": "plain", "value": "Ada"}, "${n}": {"type": "plain", "value": 3}},
    )
    pipeline_id = client.start(tree, {"name": "Grace"})
    state = client.wait(pipeline_id, timeout=30)

    assert state["state"] == FINISHED
    assert {node_id: node["state"] for node_id, node in state["children"].items()} == {
        "start": FINISHED,
        "a0": FINISHED,
        "end": FINISHED,
    }
    data = client.get_node_data(pipeline_id, "a0")
    assert data["inputs"] == {"greeting": "hello Grace", "count": 3, "_loop": 1, "_inner_loop": 1}
    assert data["outputs"]["echo"] == {"greeting": "hello Grace", "count": 3}
    assert data["outputs"]["_result"] is True
    node = state["children"]["a0"]
    assert (node["loop"], node["retry"], node["skip"], node["error_ignored"]) == (1, 0, False, False)
    assert node["start_time"] is not None and node["finish_time"] >= node["start_time"]


def test_a_chain_of_100_activities_finishes_in_order(client: EngineClient, start_worker: Any) -> None:
    start_worker("add", concurrency=2)
    tree = chain_tree(["add"] * 100, inputs={"a": {"type": "plain", "value": 2}, "b": {"type": "plain", "value": 3}})
    pipeline_id = client.start(tree)
    state = client.wait(pipeline_id, timeout=60)

    assert state["state"] == FINISHED
    assert len(state["children"]) == 102
    assert all(node["state"] == FINISHED for node in state["children"].values())
    started = [state["children"][f"a{i}"]["start_time"] for i in range(100)]
    assert started == sorted(started)
    assert client.get_node_data(pipeline_id, "a99")["outputs"] == {"sum": 5, "_result": True}


def test_a_component_that_raises_fails_the_node_and_the_pipeline(
    client: EngineClient, start_worker: Any, record_file: Path
) -> None:
    start_worker("boom", "echo", env={"WORKER_RECORD_FILE": str(record_file)})
    tree = chain_tree(["echo", "boom", "echo"], inputs={"message": {"type": "plain", "value": "disk full"}})
    pipeline_id = client.start(tree)
    state = client.wait(pipeline_id, timeout=30)

    assert state["state"] == FAILED
    assert state["children"]["a1"]["state"] == FAILED
    assert "a2" not in state["children"] and "end" not in state["children"]  # never reached: no state
    data = client.get_node_data(pipeline_id, "a1")
    assert data["ex_data"] == "ValueError: disk full"
    assert data["outputs"]["_result"] is False
    assert data["outputs"]["ex_data"] == "ValueError: disk full"
    assert [e["node_id"] for e in executions(record_file)] == ["a0", "a1"]  # nothing after it ran


def test_a_worker_killed_mid_task_is_replaced_after_its_lease(
    client: EngineClient, start_worker: Any, record_file: Path
) -> None:
    env = {"WORKER_RECORD_FILE": str(record_file)}
    first = start_worker("sleep", "echo", env=env)
    tree = chain_tree(
        ["sleep", "echo"],
        inputs={"seconds": {"type": "plain", "value": 30}, "first_attempt_only": {"type": "plain", "value": True}},
    )
    pipeline_id = client.start(tree)
    wait_for(lambda: executions(record_file), what="the first worker to start the task")
    first.kill()
    start_worker("sleep", "echo", env=env)
    state = client.wait(pipeline_id, timeout=30)

    assert state["state"] == FINISHED
    sleeps = [e for e in executions(record_file) if e["node_id"] == "a0" and e.get("event") == "started"]
    assert [e["attempt"] for e in sleeps] == [1, 2]
    assert sleeps[0]["pid"] != sleeps[1]["pid"]
    assert client.get_node_data(pipeline_id, "a0")["outputs"]["attempt"] == 2


def test_a_result_sent_with_a_stale_token_is_refused(client: EngineClient, server: ServerProcess) -> None:
    pipeline_id = client.start(chain_tree(["manual"]))
    with grpc.insecure_channel(server.address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)

        def poll() -> worker_pb2.Task:
            reply = worker.PollTasks(
                worker_pb2.PollTasksRequest(worker_id="t", component_codes=["manual"], max_tasks=1, wait_ms=10_000)
            )
            assert len(reply.tasks) == 1
            return reply.tasks[0]

        first = poll()
        assert first.attempt == 1
        second = poll()  # offered again after the 3 s lease ran out without a heartbeat
        assert (second.task_id, second.attempt) == (first.task_id, 2)
        with pytest.raises(grpc.RpcError) as refused:
            worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=first.token, outputs_json="{}"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stale task token" in refused.value.details()
        with pytest.raises(grpc.RpcError) as heartbeat:
            worker.Heartbeat(worker_pb2.HeartbeatRequest(token=first.token))
        assert heartbeat.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        reply = worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=second.token, outputs_json='{"ok": 1}'))
        assert reply.duplicate is False
        again = worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=second.token, outputs_json='{"ok": 1}'))
        assert again.duplicate is True  # the same completion twice is harmless
    state = client.wait(pipeline_id, timeout=10)
    assert state["state"] == FINISHED
    assert client.get_node_data(pipeline_id, "a0")["outputs"] == {"ok": 1, "_result": True}


def test_a_heartbeat_keeps_the_lease(client: EngineClient, server: ServerProcess) -> None:
    client.start(chain_tree(["manual"]))
    with grpc.insecure_channel(server.address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        request = worker_pb2.PollTasksRequest(worker_id="t", component_codes=["manual"], max_tasks=1, wait_ms=5000)
        [task] = worker.PollTasks(request).tasks
        for _ in range(5):  # 5 s of work against a 3 s lease
            time.sleep(1)
            reply = worker.Heartbeat(worker_pb2.HeartbeatRequest(token=task.token))
            assert reply.cancel_requested is False
            assert reply.lease_deadline_unix_ms > time.time() * 1000
        quick = worker_pb2.PollTasksRequest(worker_id="t2", component_codes=["manual"], max_tasks=1, wait_ms=0)
        assert list(worker.PollTasks(quick).tasks) == []  # not offered to anyone else
        worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token))


def test_two_workers_polling_one_code_never_get_the_same_attempt(
    client: EngineClient, start_worker: Any, record_file: Path
) -> None:
    env = {"WORKER_RECORD_FILE": str(record_file)}
    start_worker("echo", concurrency=8, env=env)
    start_worker("echo", concurrency=8, env=env)
    pipeline_ids = [client.start(chain_tree(["echo", "echo"])) for _ in range(100)]
    for pipeline_id in pipeline_ids:
        assert client.wait(pipeline_id, timeout=60)["state"] == FINISHED
    runs = executions(record_file)
    assert len(runs) == 200
    attempts = Counter((run["task_id"], run["attempt"]) for run in runs)
    assert max(attempts.values()) == 1
    assert len({run["pid"] for run in runs}) == 2  # both workers did work


def test_the_server_killed_while_50_pipelines_run_finishes_them_all_after_a_restart(
    client: EngineClient, server: ServerProcess, start_worker: Any, record_file: Path
) -> None:
    env = {"WORKER_RECORD_FILE": str(record_file)}
    start_worker("sleep", concurrency=16, env=env)
    tree = chain_tree(["sleep"] * 5, inputs={"seconds": {"type": "plain", "value": 0.1}})
    pipeline_ids = [client.start(tree) for _ in range(50)]
    wait_for(lambda: len(executions(record_file)) >= 60, what="the pipelines to be under way")
    server.kill()
    server.start()  # same address, same database
    for pipeline_id in pipeline_ids:
        state = client.wait(pipeline_id, timeout=90)
        assert state["state"] == FINISHED, state
        assert all(node["state"] == FINISHED for node in state["children"].values())
        for node_id in ("a0", "a1", "a2", "a3", "a4"):
            assert state["children"][node_id]["retry"] == 0
            assert client.get_node_histories(pipeline_id, node_id) == []  # one finished attempt, no other
    finished = Counter(
        (e["pipeline_id"], e["node_id"]) for e in executions(record_file) if e.get("event") == "finished"
    )
    assert set(finished) == {(p, f"a{i}") for p in pipeline_ids for i in range(5)}


@pytest.mark.parametrize(
    ("tree_json", "fragment"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({k: v for k, v in chain_tree(["echo"]).items() if k != "start_event"}), "no start event"),
        ('{"activities": {"x": {}, "x": {}}}', "duplicate id 'x'"),
    ],
    ids=["not-json", "no-start", "duplicate-id"],
)
def test_malformed_trees_are_invalid_argument_and_the_server_keeps_serving(
    client: EngineClient, start_worker: Any, tree_json: str, fragment: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        client.start(tree_json)
    assert fragment in refused.value.message
    start_worker("echo")
    assert client.wait(client.start(chain_tree(["echo"])), timeout=30)["state"] == FINISHED


def test_graph_problems_name_the_node_or_flow(client: EngineClient) -> None:
    dangling = chain_tree(["echo"])
    dangling["flows"]["f1"]["target"] = "ghost"
    unreachable = chain_tree(["echo"])
    unreachable["activities"]["lonely"] = {
        "id": "lonely",
        "type": "ServiceActivity",
        "incoming": [],
        "outgoing": "fl",
        "component": {"code": "echo", "inputs": {}},
    }
    unreachable["flows"]["fl"] = {"id": "fl", "source": "lonely", "target": "end", "is_default": False}
    unreachable["end_event"]["incoming"] = ["f1", "fl"]
    for tree, fragment in ((dangling, "'ghost'"), (unreachable, "'lonely' cannot be reached")):
        with pytest.raises(InvalidArgument) as refused:
            client.start(tree)
        assert fragment in refused.value.message
        problems = client.validate(tree)
        assert any(fragment in problem["message"] for problem in problems)
    assert client.validate(chain_tree(["echo"])) == []


def test_unknown_ids_are_not_found(client: EngineClient) -> None:
    with pytest.raises(NotFound, match="'nope' does not exist"):
        client.get_state("nope")
    pipeline_id = client.start(chain_tree(["echo", "echo"]))
    with pytest.raises(NotFound, match="has no node 'ghost'"):
        client.get_node_data(pipeline_id, "ghost")
    with pytest.raises(NotFound, match="has not been reached"):
        client.get_node_data(pipeline_id, "a1")


def test_oversized_outputs_are_refused_with_the_limit_named(client: EngineClient, server: ServerProcess) -> None:
    client.start(chain_tree(["manual"]))
    with grpc.insecure_channel(server.address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        [task] = worker.PollTasks(
            worker_pb2.PollTasksRequest(worker_id="t", component_codes=["manual"], max_tasks=1, wait_ms=5000)
        ).tasks
        huge = json.dumps({"blob": "x" * (5 * 1024 * 1024)})
        with pytest.raises(grpc.RpcError) as refused:
            worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token, outputs_json=huge))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-payload-bytes" in refused.value.details()
        # The task is still the worker's to finish.
        worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token, outputs_json='{"small": true}'))


def test_an_idempotency_key_starts_one_pipeline(client: EngineClient) -> None:
    first = client.start(chain_tree(["echo"]), idempotency_key="order-42")
    second = client.start(chain_tree(["echo"]), idempotency_key="order-42")
    assert first == second
    assert [p["id"] for p in client.list_pipelines()] == [first]


def test_operations_of_later_versions_answer_unimplemented(client: EngineClient) -> None:
    with pytest.raises(Unimplemented, match="registered template is not implemented"):
        client.start(None, template_id="nightly-report")


def test_a_result_for_a_task_of_a_finished_node_is_refused(client: EngineClient, server: ServerProcess) -> None:
    client.start(chain_tree(["manual"]))
    with grpc.insecure_channel(server.address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        [task] = worker.PollTasks(
            worker_pb2.PollTasksRequest(worker_id="t", component_codes=["manual"], max_tasks=1, wait_ms=5000)
        ).tasks
        worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token))
        with pytest.raises(grpc.RpcError) as refused:
            worker.FailTask(worker_pb2.FailTaskRequest(token=task.token, error_message="late"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as malformed:
            worker.CompleteTask(worker_pb2.CompleteTaskRequest(token="garbage"))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_pipelines_are_listed_by_state(client: EngineClient, start_worker: Any) -> None:
    start_worker("echo", "boom")
    ok = client.start(chain_tree(["echo"]))
    bad = client.start(chain_tree(["boom"]))
    client.wait(ok, timeout=30)
    client.wait(bad, timeout=30)
    assert [p["id"] for p in client.list_pipelines(states=["FAILED"])] == [bad]
    assert {p["id"] for p in client.list_pipelines()} == {ok, bad}
