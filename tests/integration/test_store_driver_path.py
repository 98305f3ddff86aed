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
