"""One engine server and one worker process shared by a whole test module (SQLite and PostgreSQL).

Tests start their own pipelines against it and read what a user would look at: states, outputs, histories,
and the executions each worker recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import create_postgres_database, drop_postgres_database
from tests.support.processes import ServerProcess, WorkerProcess
from worker_sdk import EngineClient


class Engine:
    def __init__(self, client: EngineClient, record: Path, server: ServerProcess) -> None:
        self.client = client
        self.record = record
        self.server = server

    def run(
        self, tree: dict[str, Any], inputs: dict[str, Any] | None = None, **options: Any
    ) -> tuple[str, dict[str, Any]]:
        pipeline_id = self.client.start(tree, inputs, **options)
        return pipeline_id, self.client.wait(pipeline_id, timeout=60)

    def executions(self, pipeline_id: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.record.read_text().splitlines() if line]
        return [line for line in lines if line["pipeline_id"] == pipeline_id]

    def outputs(self, pipeline_id: str, node_id: str) -> dict[str, Any]:
        return dict(self.client.get_node_data(pipeline_id, node_id)["outputs"])

    def node(self, pipeline_id: str, node_id: str) -> dict[str, Any] | None:
        try:
            return find(self.client.get_state(pipeline_id), node_id)
        except KeyError:
            return None

    def wait_for(self, condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def wait_node(self, pipeline_id: str, node_id: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            node = self.node(pipeline_id, node_id)
            return node if node is not None and node["state"] in states else None

        found: dict[str, Any] = self.wait_for(reached, timeout, f"node {node_id} to be {'/'.join(states)}")
        return found


def flat_states(state: dict[str, Any]) -> dict[str, str]:
    """node id -> state for every node with a state, subprocess children included."""
    result: dict[str, str] = {}
    for node_id, node in state["children"].items():
        result[node_id] = node["state"]
        result.update(flat_states(node))
    return result


def find(state: dict[str, Any], node_id: str) -> dict[str, Any]:
    for child_id, node in state["children"].items():
        if child_id == node_id:
            return dict(node)
        try:
            return find(node, node_id)
        except KeyError:
            continue
    raise KeyError(node_id)


def module_engine(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    codes: Sequence[str],
    server_args: Sequence[str] = (),
) -> Iterator[Engine]:
    """Body of a module-scoped fixture parametrized with "sqlite" / "postgresql"."""
    folder = tmp_path_factory.mktemp("engine")
    database_name = ""
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'engine.db'}"
    else:
        admin_url = request.getfixturevalue("postgres_admin_url")
        url, database_name = create_postgres_database(admin_url)
    server = ServerProcess(url, log_dir=folder, extra_args=list(server_args))
    server.start()
    record = folder / "executions.jsonl"
    record.touch()
    worker = WorkerProcess(
        server.address, codes, concurrency=16, log_dir=folder, env={"WORKER_RECORD_FILE": str(record)}
    )
    worker.start()
    try:
        with EngineClient(server.address) as client:
            yield Engine(client, record, server)
    finally:
        worker.stop()
        server.stop()
        if database_name:
            drop_postgres_database(request.getfixturevalue("postgres_admin_url"), database_name)
