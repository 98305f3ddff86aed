"""Schema migrations: the models and the migrations agree, and a server refuses a database it does not match."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from storage.database import create_database_engines
from storage.migrate import head_revision, upgrade
from storage.schema import metadata
from tests.support.processes import ROOT, ServerProcess
from worker_sdk import EngineClient


def test_the_migrations_create_exactly_the_models(database_url: str) -> None:
    engine = create_database_engines(database_url)[0]
    try:
        upgrade(engine)
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), metadata)
        assert differences == [], f"models and migrations differ: add a migration for {differences}"
    finally:
        engine.dispose()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine_server", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_migrate_upgrades_an_empty_database_and_says_so(database_url: str) -> None:
    first = run_cli("migrate", "--database-url", database_url)
    assert first.returncode == 0, first.stderr
    assert f"schema: empty -> {head_revision()}" in first.stdout
    again = run_cli("migrate", "--database-url", database_url)
    assert f"schema already at {head_revision()}" in again.stdout


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_server_refuses_a_schema_from_a_newer_engine(database_url: str, tmp_path: Path) -> None:
    engine = create_database_engines(database_url)[0]
    upgrade(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    engine.dispose()
    server = ServerProcess(database_url, log_dir=tmp_path)
    with pytest.raises(RuntimeError, match="exited with 1"):
        server.start(timeout=20)
    assert "revision f00d, which this server does not know" in server.log()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_second_server_on_the_same_sqlite_file_is_refused(database_url: str, tmp_path: Path) -> None:
    first = ServerProcess(database_url, log_dir=tmp_path / "first")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first.start()
    try:
        second = ServerProcess(database_url, log_dir=tmp_path / "second")
        with pytest.raises(RuntimeError, match="exited with 1"):
            second.start(timeout=20)
        assert "another engine server is already using" in second.log()
        assert "PostgreSQL" in second.log()
    finally:
        first.stop()


@contextlib.contextmanager
def _client_of(server: ServerProcess) -> Iterator[EngineClient]:
    """Starts the server, gives a client of it, and stops the server after."""
    server.start()
    try:
        with EngineClient(server.address) as client:
            yield client
    finally:
        server.stop()


def _complete_next_task(address: str, code: str) -> tuple[str, Any]:
    """Polls one task of `code` and completes it; returns its pipeline id and the CompleteTask error (or None)."""
    import grpc

    from engine_api.engine.v1 import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        [task] = worker.PollTasks(
            worker_pb2.PollTasksRequest(worker_id="w", component_codes=[code], wait_ms=5000)
        ).tasks
        try:
            worker.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token))
        except grpc.RpcError as error:
            return task.pipeline_id, error
        return task.pipeline_id, None


def _execute(database_url: str, *statements: str, **parameters: str) -> None:
    engine = create_database_engines(database_url)[0]
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement), parameters)
    finally:
        engine.dispose()


def test_upgrading_from_the_first_migration_keeps_running_pipelines_running(database_url: str, tmp_path: Path) -> None:
    from alembic import command

    from storage.migrate import _config
    from tests.trees import chain_tree

    server = ServerProcess(database_url, log_dir=tmp_path)
    with _client_of(server) as client:
        pipeline_ids = [client.start(chain_tree(["later", "later"])) for _ in range(3)]
    engine = create_database_engines(database_url)[0]
    with engine.begin() as connection:  # back to the database as the first migration made it
        command.downgrade(_config(connection), "0001")
    engine.dispose()
    refused = ServerProcess(database_url, log_dir=tmp_path / "refused")
    (tmp_path / "refused").mkdir()
    with pytest.raises(RuntimeError, match="exited with 1"):
        refused.start(timeout=20)
    assert "run `engine-server migrate`" in refused.log()
    assert run_cli("migrate", "--database-url", database_url).returncode == 0
    with _client_of(server) as client:
        for pipeline_id in pipeline_ids:
            assert client.get_state(pipeline_id)["state"] == "RUNNING"
        for _ in range(6):
            assert _complete_next_task(server.address, "later")[1] is None
        assert all(client.wait(p, timeout=10)["state"] == "FINISHED" for p in pipeline_ids)


def test_purge_deletes_only_pipelines_that_ended_long_enough_ago(database_url: str, tmp_path: Path) -> None:
    from tests.trees import chain_tree
    from worker_sdk import NotFound

    with _client_of(ServerProcess(database_url, log_dir=tmp_path)) as client:
        ended = client.start(chain_tree(["x"]))
        client.revoke_pipeline(ended)
        running = client.start(chain_tree(["x"]))
        assert client.purge_pipelines(older_than_seconds=3600) == 0  # nothing ended an hour ago
        assert client.purge_pipelines(older_than_seconds=0) == 1
        with pytest.raises(NotFound):
            client.get_state(ended)
        assert client.get_state(running)["state"] == "RUNNING"
        client.revoke_pipeline(running)
    engine = create_database_engines(database_url)[0]
    with engine.connect() as connection:  # nothing of the purged pipeline is left behind, its tree included
        trees = connection.execute(text("SELECT pipeline_id FROM pipeline_trees")).scalars().all()
    engine.dispose()
    assert sorted(trees) == [running]
    result = run_cli("purge", "--older-than", "0s", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert "purged 1 pipelines" in result.stdout
    bad = run_cli("purge", "--older-than", "soon", "--database-url", database_url)
    assert bad.returncode != 0 and "whole number and s, m, h or d" in bad.stderr


def test_a_pipeline_whose_tree_is_gone_fails_alone(database_url: str, tmp_path: Path) -> None:
    import grpc

    from tests.trees import chain_tree
    from worker_sdk import NotFound

    server = ServerProcess(database_url, log_dir=tmp_path)
    with _client_of(server) as client:
        broken, healthy = (client.start(chain_tree(["later"])) for _ in range(2))
    # Changed behind the engine's back (by hand, or a tool that knows an older schema).
    _execute(database_url, "DELETE FROM pipeline_trees WHERE pipeline_id = :id", id=broken)
    with _client_of(server) as client:
        with pytest.raises(NotFound):
            client.get_state(broken)
        errors = dict(_complete_next_task(server.address, "later") for _ in range(2))
        assert errors[healthy] is None
        assert errors[broken].code() == grpc.StatusCode.NOT_FOUND
        assert client.wait(healthy, timeout=10)["state"] == "FINISHED"
    assert f"pipeline {broken} has no stored tree" in server.log()


def test_a_tree_left_behind_does_not_block_a_new_start_with_its_id(database_url: str, tmp_path: Path) -> None:
    from tests.trees import chain_tree

    server = ServerProcess(database_url, log_dir=tmp_path)
    with _client_of(server) as client:
        client.start(chain_tree(["old"]), pipeline_id="reused-id")
        client.revoke_pipeline("reused-id")
    # What a purge by an engine older than pipeline_trees leaves: everything but the tree is gone.
    _execute(
        database_url,
        *(
            f"DELETE FROM {table} WHERE pipeline_id = :id"
            for table in ("node_states", "node_histories", "tasks", "timers")
        ),
        "DELETE FROM pipelines WHERE id = :id",
        id="reused-id",
    )
    with _client_of(server) as client:
        assert client.start(chain_tree(["new", "new"]), pipeline_id="reused-id") == "reused-id"
        for _ in range(2):
            assert _complete_next_task(server.address, "new") == ("reused-id", None)
        state = client.wait("reused-id", timeout=10)
        assert state["state"] == "FINISHED"
        assert set(state["children"]) >= {"a0", "a1"}  # the new tree's nodes, not the old one's
