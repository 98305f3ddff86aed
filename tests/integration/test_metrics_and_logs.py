"""What an operator's monitoring sees: /metrics scraped from a real server during a real run, and its JSON logs."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import ServerProcess, WorkerProcess, free_port
from tests.trees import chain_tree
from worker_sdk import EngineClient

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def plain(**values: Any) -> dict[str, Any]:
    return {name: {"type": "plain", "value": v} for name, v in values.items()}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(port: int, name: str, expected: float, **labels: str) -> Samples:
    """Scrapes until the sample reaches `expected`; returns that scrape."""
    found: list[Samples] = []

    def reached() -> bool:
        found[:] = [scrape(port)]
        return value(found[0], name, **labels) == expected

    wait_for(reached, f"{name}{labels} == {expected}")
    return found[0]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def started() -> Iterator[list[ServerProcess | WorkerProcess]]:
    """Everything a test starts is stopped after it, whatever happens."""
    processes: list[ServerProcess | WorkerProcess] = []
    yield processes
    for process in reversed(processes):
        process.stop()


def start_server(started: list[Any], database_url: str, log_dir: Path, *args: str) -> ServerProcess:
    server = ServerProcess(database_url, log_dir=log_dir, extra_args=list(args))
    started.append(server)
    server.start()
    return server


def start_worker(started: list[Any], server: ServerProcess, log_dir: Path, *codes: str) -> WorkerProcess:
    log_dir.mkdir(exist_ok=True)
    worker = WorkerProcess(server.address, codes, concurrency=4, log_dir=log_dir)
    started.append(worker)
    worker.start()
    return worker


def test_metrics_move_as_tasks_are_queued_claimed_completed_failed_and_leases_expire(
    database_url: str, tmp_path: Path, started: list[Any]
) -> None:
    metrics_port = free_port()
    server = start_server(
        started,
        database_url,
        tmp_path,
        *("--metrics-port", str(metrics_port), "--lease-ms", "1500", "--reap-interval-ms", "200"),
    )
    before = scrape(metrics_port)
    [build] = [dict(labels) for (name, labels), v in before.items() if name == "engine_build_info" and v == 1]
    assert build["version"] == "0.1.0"
    assert value(before, "engine_pipelines", state="RUNNING") == 0
    assert ("engine_pipelines", (("state", "FINISHED"),)) in before  # every state is exported, 0 included
    assert value(before, "engine_polls_waiting") == 0
    assert value(before, "engine_tasks_queued_total", component_code="echo") == 0

    with EngineClient(server.address) as client:
        # A worker takes a long task and dies with it: the lease runs out and the task is offered again.
        doomed = start_worker(started, server, tmp_path / "doomed", "sleep")
        sleeper = client.start(chain_tree(["sleep"], inputs=plain(seconds=60, first_attempt_only=True)))
        scrape_until(metrics_port, "engine_tasks_claimed_total", 1, component_code="sleep")
        scrape_until(metrics_port, "engine_pipelines", 1, state="RUNNING")
        doomed.kill()
        expired = scrape_until(metrics_port, "engine_lease_expiries_total", 1, component_code="sleep")
        assert value(expired, "engine_tasks_queued_total", component_code="sleep") == 1  # offered again, not new
        assert f"pipeline_id={sleeper}" in wait_for(
            lambda: "\n".join(line for line in server.log().splitlines() if "lease expired" in line),
            "the lease expiry's log line",
        )

        # Queued, with no worker to claim them yet.
        echoes = [client.start(chain_tree(["echo", "echo"], inputs=plain(n=i))) for i in range(3)]
        failing = client.start(chain_tree(["boom"], inputs=plain(message="no luck")))
        queued = scrape(metrics_port)
        assert value(queued, "engine_tasks_queued_total", component_code="echo") == 3  # each first node
        assert value(queued, "engine_tasks_queued_total", component_code="boom") == 1
        assert value(queued, "engine_tasks_claimed_total", component_code="echo") == 0
        assert value(queued, "engine_tasks_completed_total", component_code="echo") == 0
        scrape_until(metrics_port, "engine_pipelines", 5, state="RUNNING")

        start_worker(started, server, tmp_path / "worker", "echo", "boom", "sleep")
        for pipeline_id in [*echoes, sleeper]:
            assert client.wait(pipeline_id, timeout=60)["state"] == "FINISHED"
        assert client.wait(failing, timeout=60)["state"] == "FAILED"

    # Counters move right after the commit that made the states visible: wait for the last of them.
    scrape_until(metrics_port, "engine_tasks_completed_total", 6, component_code="echo")
    scrape_until(metrics_port, "engine_tasks_completed_total", 1, component_code="sleep")
    after = scrape_until(metrics_port, "engine_tasks_failed_total", 1, component_code="boom")
    assert value(after, "engine_tasks_queued_total", component_code="echo") == 6
    assert value(after, "engine_tasks_claimed_total", component_code="echo") == 6
    assert value(after, "engine_tasks_completed_total", component_code="echo") == 6
    assert value(after, "engine_tasks_failed_total", component_code="echo") == 0
    assert value(after, "engine_tasks_failed_total", component_code="boom") == 1
    assert value(after, "engine_tasks_completed_total", component_code="boom") == 0
    assert value(after, "engine_tasks_claimed_total", component_code="sleep") == 2  # the dead worker's, then again
    assert value(after, "engine_tasks_completed_total", component_code="sleep") == 1
    assert value(after, "engine_lease_expiries_total", component_code="sleep") == 1
    # End-to-end latency: one observation per applied result; the echoes waited for a worker to start.
    assert value(after, "engine_task_latency_seconds_count", component_code="echo") == 6
    assert value(after, "engine_task_latency_seconds_count", component_code="boom") == 1
    assert value(after, "engine_task_latency_seconds_sum", component_code="echo") > 0
    assert value(after, "engine_task_latency_seconds_bucket", component_code="echo", le="+Inf") == 6
    assert value(after, "engine_db_batch_duration_seconds_count") > 0
    assert value(after, "engine_db_commit_duration_seconds_count") > 0
    # Every start, report and heartbeat went through some batch: 5 starts + 8 results at least.
    assert value(after, "engine_db_batch_operations_sum") >= 13
    final = scrape_until(metrics_port, "engine_pipelines", 0, state="RUNNING")
    assert value(final, "engine_pipelines", state="FINISHED") == 4
    assert value(final, "engine_pipelines", state="FAILED") == 1
    # The live worker keeps a long poll open.
    wait_for(lambda: value(scrape(metrics_port), "engine_polls_waiting") >= 1, "a waiting long poll")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_json_logs_parse_and_lines_about_a_pipeline_carry_its_ids(
    database_url: str, tmp_path: Path, started: list[Any]
) -> None:
    server = start_server(started, database_url, tmp_path, "--log-format", "json")
    start_worker(started, server, tmp_path / "worker", "boom", "echo")
    with EngineClient(server.address) as client:
        failing = client.start(chain_tree(["echo", "boom"], inputs=plain(message="disk full on /data")))
        quiet = client.start(chain_tree(["echo", "echo"]))
        assert client.wait(failing, timeout=60)["state"] == "FAILED"
        assert client.wait(quiet, timeout=60)["state"] == "FINISHED"
    server.stop()

    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]  # every line is JSON
    assert lines
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= line.keys(), line
        assert line["ts"].endswith("Z")
    assert any(line["message"].startswith("engine server listening on") for line in lines)

    about_failing = [line for line in lines if line.get("pipeline_id") == failing]
    node_failed = [line for line in about_failing if line.get("node_id") == "a1"]
    assert node_failed, about_failing
    assert node_failed[0]["level"] == "INFO"
    assert node_failed[0]["component_code"] == "boom"
    assert "disk full on /data" in node_failed[0]["message"]
    assert any(line["message"] == "pipeline failed" and "node_id" not in line for line in about_failing)
    # A pipeline that runs without trouble writes nothing at INFO: no per-task lines on the hot path.
    assert not [line for line in lines if quiet in json.dumps(line)]
