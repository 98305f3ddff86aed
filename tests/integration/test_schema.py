"""Schema migrations: the models and the migrations agree, and a server refuses a database it does not match."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from storage.database import create_database_engines
from storage.migrate import head_revision, upgrade
from storage.schema import metadata
from tests.support.processes import ROOT, ServerProcess


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
