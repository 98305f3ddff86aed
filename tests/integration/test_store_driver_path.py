"""The store's hot statements skip SQLAlchemy's execution and go to the database driver directly.

What a caller sees must not change: the same rows (by attribute), and driver errors raised as SQLAlchemy's
exception types, which the engine's batch retry tells apart (a replica's concurrent insert, a lost connection).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from storage.schema import QUEUED
from storage.store import Store, WriteSet
from tests.conftest import create_postgres_database, drop_postgres_database


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    store.prepare_schema()
    yield store
    store.dispose()


def _task(task_id: str, code: str, available_at: int) -> dict[str, Any]:
    # Leaves out every column with a fixed default (result_kind among them): the driver path fills them in.
    return {
        "id": task_id,
        "pipeline_id": "p1",
        "node_id": f"n-{task_id}",
        "node_version": "v1",
        "kind": 0,
        "component_code": code,
        "component_version": "",
        "status": QUEUED,
        "available_at": available_at,
        "inputs_json": "{}",
        "created_at": available_at,
    }


def test_claim_returns_rows_by_attribute_oldest_first_and_only_of_the_asked_codes(store: Store) -> None:
    with store.writer.connect() as conn, conn.begin():
        store.write(conn, WriteSet(task_inserts=[_task("t2", "a", 20), _task("t1", "a", 10), _task("t3", "b", 5)]))
    with store.writer.connect() as conn, conn.begin():
        claimed = store.claim(conn, codes=["a"], limit=5, now=100, lease_deadline=500, worker_id="w", secret="s")
        loaded = store.load_tasks(conn, ["t1", "t3", "missing"])

    assert [(row.id, row.claim_no, row.claim_secret, row.lease_deadline) for row in claimed] == [
        ("t1", 1, "s", 500),
        ("t2", 1, "s", 500),
    ]
    assert claimed[0].result_kind == 0 and claimed[0].outputs_json == "{}"  # the left-out defaults
    assert sorted(loaded) == ["t1", "t3"]
    assert loaded["t3"].status == QUEUED and loaded["t3"].component_code == "b"


def test_a_duplicate_insert_through_the_driver_raises_sqlalchemys_integrity_error(store: Store) -> None:
    with store.writer.connect() as conn, conn.begin():
        store.write(conn, WriteSet(task_inserts=[_task("t1", "a", 10)]))

    with pytest.raises(IntegrityError), store.writer.connect() as conn, conn.begin():
        store.write(conn, WriteSet(task_inserts=[_task("t1", "a", 10)]))

    with store.writer.connect() as conn, conn.begin():  # the failed transaction left nothing behind
        assert list(store.load_tasks(conn, ["t1"])) == ["t1"]


def test_begin_on_a_locked_sqlite_database_raises_sqlalchemys_operational_error(tmp_path: Path) -> None:
    """The engine retries a batch on SQLAlchemy's OperationalError ("database is locked"), not on sqlite3's."""
    path = tmp_path / "engine.db"
    store = Store(f"sqlite:///{path}")
    store.prepare_schema()
    other_writer = sqlite3.connect(path, isolation_level=None)
    other_writer.execute("BEGIN IMMEDIATE")
    try:
        with store.writer.connect() as conn:
            conn.connection.driver_connection.execute("PRAGMA busy_timeout=50")  # type: ignore[union-attr]
            with pytest.raises(OperationalError, match="database is locked"), conn.begin():
                pass
    finally:
        other_writer.rollback()
        other_writer.close()
        store.dispose()


def test_a_pipelined_batch_reads_back_what_it_wrote_and_commits_it(store: Store) -> None:
    """In `Store.transaction` (psycopg's pipeline mode on PostgreSQL) reads wait for the writes sent before them."""
    with store.writer.connect() as conn, store.transaction(conn):
        store.write(conn, WriteSet(task_inserts=[_task("t1", "a", 10), _task("t2", "a", 20)]))
        claimed = store.claim(conn, codes=["a"], limit=1, now=100, lease_deadline=500, worker_id="w", secret="s")
        assert store.load_pipeline(conn, "p1") is None
        assert list(store.load_nodes(conn, "p1")) == []
        assert store.next_timer_at(conn) is None

    assert [row.id for row in claimed] == ["t1"]
    with store.writer.connect() as conn, conn.begin():
        assert sorted(store.load_tasks(conn, ["t1", "t2"])) == ["t1", "t2"]


def test_an_error_in_a_pipelined_batch_is_sqlalchemys_and_leaves_nothing_behind(store: Store) -> None:
    with store.writer.connect() as conn, conn.begin():
        store.write(conn, WriteSet(task_inserts=[_task("t1", "a", 10)]))

    with pytest.raises(IntegrityError), store.writer.connect() as conn, store.transaction(conn):
        store.write(conn, WriteSet(task_inserts=[_task("t2", "a", 10), _task("t1", "a", 10)]))
        store.claim(conn, codes=["a"], limit=5, now=100, lease_deadline=500, worker_id="w", secret="s")

    with store.writer.connect() as conn, conn.begin():
        assert list(store.load_tasks(conn, ["t1", "t2"])) == ["t1"]
        assert store.claim(conn, codes=["a"], limit=5, now=100, lease_deadline=500, worker_id="w", secret="s")


def test_a_transaction_whose_commit_fails_is_rolled_back_and_its_connection_stays_usable(store: Store) -> None:
    """The duplicate is the last statement and nothing reads after it: on PostgreSQL it fails at COMMIT."""
    with store.writer.connect() as conn, conn.begin():
        store.write(conn, WriteSet(task_inserts=[_task("t1", "a", 10)]))

    with store.writer.connect() as conn:
        with pytest.raises(IntegrityError), store.transaction(conn):
            store.write(conn, WriteSet(task_inserts=[_task("t2", "a", 20), _task("t1", "a", 10)]))
        with store.transaction(conn):  # the same connection, as the engine's batches use one
            store.write(conn, WriteSet(task_inserts=[_task("t3", "a", 30)]))

    with store.writer.connect() as conn, conn.begin():
        assert sorted(store.load_tasks(conn, ["t1", "t2", "t3"])) == ["t1", "t3"]


@pytest.fixture
def postgres_store(postgres_admin_url: str) -> Iterator[Store]:
    url, name = create_postgres_database(postgres_admin_url)
    store = Store(url)
    store.prepare_schema()
    yield store
    store.dispose()
    drop_postgres_database(postgres_admin_url, name)


def test_on_postgresql_a_batchs_writes_its_claim_and_its_commit_wait_for_the_server_once(
    postgres_store: Store, tmp_path: Path
) -> None:
    """Each wait is a round trip to the server process; a report's batch writes four kinds of rows, then claims."""
    trace_path = tmp_path / "protocol.trace"
    changes = WriteSet(
        task_inserts=[_task("t1", "a", 10)],
        task_completions=[{"b_id": "t1", "completed_claim": 1, "result_kind": 1}],
        lease_extensions=[{"b_id": "t1", "b_claim_no": 1, "lease_deadline": 5, "progress_json": ""}],
        task_releases=[{"b_id": "t1", "b_claim_no": 1}],
    )
    with postgres_store.writer.connect() as conn, trace_path.open("w") as trace:
        driver: Any = conn.connection.driver_connection
        driver.pgconn.trace(trace.fileno())
        with postgres_store.transaction(conn):
            postgres_store.write(conn, changes)
            claimed = postgres_store.claim(
                conn, codes=["a"], limit=1, now=100, lease_deadline=500, worker_id="w", secret="s"
            )
        driver.pgconn.untrace()

    assert [row.id for row in claimed] == ["t1"]
    # The client's messages (psycopg's protocol trace: time, F(rontend), length, type, ...) that ask the server to
    # answer now. Without the pipeline: a Query for BEGIN, a Sync per statement and more, a Query for COMMIT.
    sent = [
        fields[3]
        for fields in (line.split("\t") for line in trace_path.read_text().splitlines())
        if fields[1:2] == ["F"]
    ]
    assert sent.count("Execute") == 7  # BEGIN, the four writes, the claim, COMMIT
    # Pipelined: BEGIN's Sync, one Flush for the writes and the claim's rows, and the pipeline's closing Sync and
    # Flush, which COMMIT goes out with. One statement at a time this was 11: a Query each for BEGIN and COMMIT,
    # a Sync and a Flush per written kind, a Sync for the claim.
    waits = [message for message in sent if message in ("Sync", "Flush", "Query")]
    assert len(waits) <= 4, sent
