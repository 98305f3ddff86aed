"""The Python SDK against a real engine server: component kinds, retries, shutdown, reconnection."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import ServerProcess
from tests.support.workers import gc_state
from tests.trees import chain_tree
from worker_sdk import Component, EngineClient, PollAgain, RetryableError, TaskContext, Worker, component

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[EngineClient]:
    with EngineClient(server.address) as engine_client:
        yield engine_client


class CountDown(Component):
    """A polling component: asks to be polled again until its counter reaches zero."""

    code = "countdown"

    def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        return PollAgain(after_ms=50, outputs={"left": inputs["start"]})

    def schedule(self, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        left = ctx.outputs["left"] - 1
        if left > 0:
            return PollAgain(after_ms=50, outputs={"left": left})
        return {"left": 0, "polls": ctx.schedule_times}


def test_a_polling_component_runs_until_it_says_done(client: EngineClient, server: ServerProcess) -> None:
    tree = chain_tree(["countdown"], inputs={"start": {"type": "plain", "value": 3}})
    with Worker(server.address, [CountDown], concurrency=2, poll_wait_ms=1000):
        pipeline_id = client.start(tree)
        state = client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    assert state["children"]["a0"]["schedule_times"] == 3
    assert client.get_node_data(pipeline_id, "a0")["outputs"] == {"left": 0, "polls": 3, "_result": True}


def test_a_retryable_error_is_offered_again_and_then_succeeds(client: EngineClient, server: ServerProcess) -> None:
    calls: list[int] = []

    @component("flaky")
    def flaky() -> dict[str, int]:
        calls.append(1)
        if len(calls) < 3:
            raise RetryableError("backend busy", retry_after_ms=10)
        return {"calls": len(calls)}

    with Worker(server.address, [flaky], poll_wait_ms=1000):
        pipeline_id = client.start(chain_tree(["flaky"]))
        state = client.wait(pipeline_id, timeout=30)
    assert state["state"] == "FINISHED"
    assert state["children"]["a0"]["retry"] == 2
    histories = client.get_node_histories(pipeline_id, "a0")
    assert [h["state"] for h in histories] == ["FAILED", "FAILED"]
    assert [h["outputs"]["ex_data"] for h in histories] == ["backend busy", "backend busy"]
    assert len({h["version"] for h in histories} | {state["children"]["a0"]["version"]}) == 3


def test_async_components_run_concurrently(client: EngineClient, server: ServerProcess) -> None:
    @component("nap")
    async def nap(seconds: float) -> dict[str, float]:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    tree = chain_tree(["nap"], inputs={"seconds": {"type": "plain", "value": 1.0}})
    with Worker(server.address, [nap], concurrency=10, poll_wait_ms=1000):
        began = time.monotonic()
        pipeline_ids = [client.start(tree) for _ in range(10)]
        for pipeline_id in pipeline_ids:
            assert client.wait(pipeline_id, timeout=30)["state"] == "FINISHED"
        took = time.monotonic() - began
    assert took < 6, f"10 one-second naps took {took:.1f}s: they did not overlap"


def test_sigterm_lets_the_running_task_finish_then_the_worker_exits(
    client: EngineClient, start_worker: Any, tmp_path: Path
) -> None:
    record = tmp_path / "runs.jsonl"
    worker = start_worker("sleep", env={"WORKER_RECORD_FILE": str(record)})
    pipeline_id = client.start(chain_tree(["sleep"], inputs={"seconds": {"type": "plain", "value": 2}}))
    deadline = time.monotonic() + 20
    while not record.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=20) == 0
    events = [json.loads(line)["event"] for line in record.read_text().splitlines()]
    assert events == ["started", "finished"]
    state = client.wait(pipeline_id, timeout=10)
    assert state["state"] == "FINISHED"


def test_a_worker_process_freezes_its_start_up_objects_out_of_the_collector(
    client: EngineClient, start_worker: Any
) -> None:
    # A worker process of its own (tests/support/workers.py calls run() on its main thread).
    start_worker("gc_state")
    state = client.wait(client.start(chain_tree(["gc_state"])), timeout=30)
    assert state["state"] == "FINISHED"
    assert client.get_node_data(state["id"], "a0")["outputs"]["frozen"] > 1000


@pytest.mark.parametrize("freeze_gc", [True, False])
def test_run_on_the_main_thread_freezes_only_while_it_runs_and_only_if_asked(
    client: EngineClient, server: ServerProcess, freeze_gc: bool
) -> None:
    assert gc.get_freeze_count() == 0
    worker = Worker(server.address, [gc_state], poll_wait_ms=1000, freeze_gc=freeze_gc)
    pipeline_id = client.start(chain_tree(["gc_state"]))

    def stop_once_finished() -> None:
        client.wait(pipeline_id, timeout=30)
        worker.stop()

    waiter = threading.Thread(target=stop_once_finished)
    waiter.start()
    worker.run()  # pytest runs tests on the main thread
    waiter.join()
    frozen_while_running = client.get_node_data(pipeline_id, "a0")["outputs"]["frozen"]
    assert (frozen_while_running > 1000) is freeze_gc
    assert gc.get_freeze_count() == 0  # as it was before run()


def test_a_worker_started_inside_another_program_leaves_the_collector_alone(
    client: EngineClient, server: ServerProcess
) -> None:
    with Worker(server.address, [gc_state], poll_wait_ms=1000):
        state = client.wait(client.start(chain_tree(["gc_state"])), timeout=30)
    assert state["state"] == "FINISHED"
    assert client.get_node_data(state["id"], "a0")["outputs"]["frozen"] == 0 == gc.get_freeze_count()


def test_workers_reconnect_when_the_server_comes_back(
    client: EngineClient, server: ServerProcess, start_worker: Any
) -> None:
    start_worker("echo")
    assert client.wait(client.start(chain_tree(["echo"])), timeout=30)["state"] == "FINISHED"
    server.stop()
    time.sleep(1.5)  # the worker finds nobody home and backs off
    server.start()
    assert client.wait(client.start(chain_tree(["echo"])), timeout=30)["state"] == "FINISHED"
