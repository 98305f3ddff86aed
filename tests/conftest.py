"""Fixtures that start real parts: engine server processes, worker processes, SQLite files, PostgreSQL databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from tests.support.processes import ServerProcess, WorkerProcess

PG_ADMIN_URL = os.environ.get("ENGINE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_SERVICES = os.environ.get("ENGINE_TEST_REQUIRE_SERVICES") == "1"


def _postgres_problem() -> str | None:
    try:
        engine = create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({type(exc).__name__}: {str(exc).splitlines()[0]})"


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    problem = _postgres_problem()
    if problem:
        if REQUIRE_SERVICES:
            pytest.fail(f"{problem}; ENGINE_TEST_REQUIRE_SERVICES=1 makes this a failure")
        pytest.skip(f"{problem}; point ENGINE_TEST_PG_URL at a reachable server to run the PostgreSQL tests")
    return PG_ADMIN_URL


def create_postgres_database(admin_url: str) -> tuple[str, str]:
    """Creates a fresh database; returns (its URL, its name)."""
    name = f"engine_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}", name


def drop_postgres_database(admin_url: str, name: str) -> None:
    admin = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, empty database of each kind: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'engine.db'}"
        return
    admin_url = request.getfixturevalue("postgres_admin_url")
    url, name = create_postgres_database(admin_url)
    yield url
    drop_postgres_database(admin_url, name)


@pytest.fixture
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real engine server process on a free port (short lease so dead workers are noticed quickly)."""
    process = ServerProcess(database_url, log_dir=tmp_path_factory.mktemp("server"), extra_args=["--lease-ms", "3000"])
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture
def start_worker(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Starts real worker processes (tests/support/workers.py) against the server; stops them after the test."""
    started: list[WorkerProcess] = []

    def start(*codes: str, concurrency: int = 4, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(
            server.address, codes, concurrency=concurrency, log_dir=tmp_path_factory.mktemp("worker"), env=env
        )
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
