"""Several engine replicas on one PostgreSQL database, with and without Redis wake-ups."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine_api.engine.v1 import worker_pb2, worker_pb2_grpc
from tests.conftest import REQUIRE_SERVICES
from tests.support.processes import ServerProcess, free_port
from tests.trees import chain_tree
from worker_sdk import EngineClient

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
