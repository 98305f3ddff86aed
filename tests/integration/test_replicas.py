"""Several engine replicas on one PostgreSQL database, with and without Redis wake-ups."""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from engine_api.engine.v1 import worker_pb2, worker_pb2_grpc
from storage.database import create_database_engines
from tests.conftest import REQUIRE_SERVICES
from tests.flows import act, data
from tests.support.module_engine import flat_states
from tests.support.processes import ServerProcess, WorkerProcess, free_port
from tests.trees import chain_tree
from worker_sdk import EngineClient
from worker_sdk.builder import (
    ConvergeGateway,
    EmptyEndEvent,
    EmptyStartEvent,
    ExclusiveGateway,
    ParallelGateway,
    SubProcess,
    build_tree,
)

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


class RedisServer:
    """A Redis of the test's own on a free port, so it can be stopped and started again."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
            if probe.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if REQUIRE_SERVICES:
            pytest.fail("redis-server is not installed; ENGINE_TEST_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def replicas(database_url: str, tmp_path: Path) -> Iterator[Any]:
    """Starts engine replicas on the test's database; every one is stopped after the test, whatever happens."""
    started: list[ServerProcess] = []

    def start(count: int, *args: str) -> list[ServerProcess]:
        for _ in range(count):
            log_dir = tmp_path / f"replica{len(started)}"
            log_dir.mkdir()
            server = ServerProcess(database_url, log_dir=log_dir, extra_args=list(args))
            started.append(server)
            server.start()
        return started[-count:]

    yield start
    for server in started:
        server.stop()


def wake_up_seconds(poller: ServerProcess, starter: ServerProcess, code: str) -> float:
    """Starts a one-task pipeline through `starter` while a long poll waits on `poller`; returns how long
    after the Start the poll received the task."""
    received: dict[str, Any] = {}

    def poll() -> None:
        with grpc.insecure_channel(poller.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            request = worker_pb2.PollTasksRequest(worker_id="w", component_codes=[code], max_tasks=1, wait_ms=15_000)
            reply = stub.PollTasks(request, timeout=30)
            received["at"] = time.monotonic()
            received["tasks"] = list(reply.tasks)
            if reply.tasks:
                stub.CompleteTask(worker_pb2.CompleteTaskRequest(token=reply.tasks[0].token))

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.5)  # the poll is waiting on the other replica
    with EngineClient(starter.address) as client:
        client.start(chain_tree([code]))
        started = time.monotonic()
    thread.join(timeout=30)
    assert received.get("tasks"), "the long poll returned without the task"
    return float(received["at"] - started)


def test_redis_wakes_a_long_poll_on_another_replica(replicas: Any, redis_server: RedisServer) -> None:
    # The database re-check is made slow, so only a Redis wake-up can explain a fast hand-over.
    a, b = replicas(2, "--redis-url", redis_server.url, "--recheck-interval-ms", "10000")
    latencies = [wake_up_seconds(b, a, "hand_over") for _ in range(3)]
    assert max(latencies) < 2.0, latencies


def test_without_redis_replicas_find_each_others_tasks_by_polling_the_database(replicas: Any) -> None:
    a, b = replicas(2, "--recheck-interval-ms", "300")
    assert wake_up_seconds(b, a, "polled") < 10.0  # well before the poll's own 15 s wait ends


def test_a_redis_restart_loses_nothing_and_wake_ups_resume(replicas: Any, redis_server: RedisServer) -> None:
    a, b = replicas(2, "--redis-url", redis_server.url, "--recheck-interval-ms", "4000")
    assert wake_up_seconds(b, a, "before") < 2.0
    redis_server.stop()
    # Redis is down: the database re-check still hands the task over (within its 4 s interval).
    assert wake_up_seconds(b, a, "during") < 10.0
    redis_server.start()
    deadline = time.monotonic() + 20
    while not all("is back: wake-ups resume" in replica.log() for replica in (a, b)):
        assert time.monotonic() < deadline, "the replicas did not reconnect to Redis"
        time.sleep(0.1)
    assert wake_up_seconds(b, a, "after") < 2.0
    assert "falling back to polling the database" in b.log()


def bamboo_shape() -> dict[str, Any]:
    """bamboo-engine's benchmark shape: two activities -> a subprocess of two -> 3-branch parallel ->
    converge -> 2-branch exclusive -> activity -> converge -> end (17 nodes, 9 of them tasks)."""

    def work(step: str) -> Any:
        return act("sleep", seconds=0.2, step=step)

    child = EmptyStartEvent()
    child.extend(work("sub 1")).extend(work("sub 2")).extend(EmptyEndEvent())
    start, fork, join = EmptyStartEvent(), ParallelGateway(), ConvergeGateway()
    choose, merge = ExclusiveGateway({0: "${n} > 0", 1: "${n} <= 0"}), ConvergeGateway()
    tail = start.extend(work("a")).extend(work("b")).extend(SubProcess(start=child)).extend(fork)
    tail = tail.connect(work("p1"), work("p2"), work("p3")).to(fork).converge(join).extend(choose)
    tail = tail.connect(work("yes"), work("no")).to(choose).converge(merge)
    tail.extend(work("last")).extend(EmptyEndEvent())
    return build_tree(start, data=data(n=1))


def claimed_tasks(database_url: str) -> int:
    engine = create_database_engines(database_url)[0]
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM tasks WHERE status = 1")).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.timeout(300)
def test_replicas_and_workers_killed_at_random_lose_nothing(
    database_url: str, replicas: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    """3 replicas, 6 worker processes, 300 pipelines of the 17-node shape started through different replicas;
    every few seconds a replica or a worker is killed with SIGKILL and started again."""
    servers = replicas(3, "--redis-url", redis_server.url, "--lease-ms", "3000")
    record = tmp_path / "executions.jsonl"
    workers = []
    for index in range(6):
        folder = tmp_path / f"worker{index}"
        folder.mkdir()
        worker = WorkerProcess(
            servers[index % 3].address,
            ["sleep"],
            concurrency=8,
            log_dir=folder,
            env={"WORKER_RECORD_FILE": str(record)},
        )
        worker.start()
        workers.append(worker)
    tree = bamboo_shape()
    clients = [EngineClient(server.address) for server in servers]
    try:
        pipeline_ids = [clients[i % 3].start(tree) for i in range(300)]
        rng = random.Random(7)
        kills = {"replica": 0, "worker": 0}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            finished = clients[0].list_pipelines(states=["FINISHED"], page_size=1000)
            if len(finished) == len(pipeline_ids):
                break
            time.sleep(1.5)
            if kills["replica"] <= kills["worker"]:  # alternate: a replica, then a worker, ...
                victim = rng.choice(servers)
                victim.kill()
                victim.start()
                kills["replica"] += 1
            else:
                victim_worker = rng.choice(workers)
                victim_worker.kill()
                victim_worker.start()
                kills["worker"] += 1
        states = {p["id"]: p["state"] for p in clients[1].list_pipelines(page_size=1000)}
        assert all(states[p] == "FINISHED" for p in pipeline_ids), {s for s in states.values()}
        assert kills["replica"] >= 2 and kills["worker"] >= 2, kills
        # Every node of every pipeline: one attempt, FINISHED, outputs applied (no retries, no loops here).
        per_pipeline = len(flat_states(clients[2].get_state(pipeline_ids[0])))
        database = create_database_engines(database_url)[0]
        with database.connect() as connection:
            counts = connection.execute(
                text(
                    "SELECT count(*), count(*) FILTER (WHERE state = 'FINISHED'), "
                    "count(*) FILTER (WHERE outputs_json LIKE :applied), max(retry), max(loop) FROM node_states"
                ),
                {"applied": '%"_result":true%'},
            ).one()
            histories = connection.execute(text("SELECT count(*) FROM node_histories")).scalar_one()
        database.dispose()
        assert tuple(counts) == (per_pipeline * 300, per_pipeline * 300, per_pipeline * 300, 0, 1)
        assert histories == 0
        assert claimed_tasks(database_url) == 0  # nothing left claimed
        executed = sum('"started"' in line for line in record.read_text().splitlines())
        # At-least-once delivery: a task whose worker or replica was killed mid-way runs again.
        print(
            f"\n{len(pipeline_ids) * 9} tasks, {executed} executions ({executed - len(pipeline_ids) * 9} re-runs "
            f"after {kills['replica']} replica and {kills['worker']} worker kills)"
        )
        assert executed >= len(pipeline_ids) * 9
    finally:
        for client in clients:
            client.close()
        for worker in workers:
            worker.stop()


def test_database_connections_terminated_mid_run_are_reopened(
    database_url: str, postgres_admin_url: str, replicas: Any, tmp_path: Path
) -> None:
    servers = replicas(2, "--lease-ms", "3000")
    record = tmp_path / "executions.jsonl"
    workers = []
    for index in range(2):
        folder = tmp_path / f"worker{index}"
        folder.mkdir()
        worker = WorkerProcess(
            servers[index].address, ["sleep"], concurrency=8, log_dir=folder, env={"WORKER_RECORD_FILE": str(record)}
        )
        worker.start()
        workers.append(worker)
    database = database_url.rsplit("/", 1)[1]
    admin = create_database_engines(postgres_admin_url)[0]
    clients = [EngineClient(server.address) for server in servers]
    try:
        pipeline_ids = [clients[i % 2].start(bamboo_shape()) for i in range(60)]
        terminated = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(clients[0].list_pipelines(states=["FINISHED"], page_size=1000)) == len(pipeline_ids):
                break
            time.sleep(1.0)
            with admin.connect() as connection:
                terminated += len(
                    connection.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :name AND pid <> pg_backend_pid()"
                        ),
                        {"name": database},
                    ).all()
                )
        states = {p["id"]: p["state"] for p in clients[1].list_pipelines(page_size=1000)}
        assert all(states[p] == "FINISHED" for p in pipeline_ids)
        assert terminated >= 2  # the servers' connections really were cut, more than once
        assert any("database error, retrying the batch" in server.log() for server in servers)
    finally:
        admin.dispose()
        for client in clients:
            client.close()
        for worker in workers:
            worker.stop()


def test_watch_on_one_replica_follows_changes_made_through_another(replicas: Any) -> None:
    a, b = replicas(2, "--recheck-interval-ms", "300")
    with EngineClient(a.address) as watcher_client, EngineClient(b.address) as other:
        pipeline_id = other.start(chain_tree(["elsewhere"]))
        stream = watcher_client.watch(pipeline_id)
        initial = [next(stream) for _ in range(3)]  # start, the waiting node, then the pipeline itself
        assert (initial[-1]["node_id"], initial[-1]["new_state"]) == (None, "RUNNING")
        with grpc.insecure_channel(b.address) as channel:
            worker = worker_pb2_grpc.WorkerServiceStub(channel)
            request = worker_pb2.PollTasksRequest(worker_id="w", component_codes=["elsewhere"], wait_ms=5000)
            [task] = worker.PollTasks(request).tasks
            worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token))
        rest = list(stream)  # ends once the pipeline FINISHED, though replica A applied none of it
        assert rest[-1]["node_id"] is None and rest[-1]["new_state"] == "FINISHED"
