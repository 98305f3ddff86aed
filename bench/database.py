"""The database of one benchmark run: a fresh SQLite file, or a fresh database on a PostgreSQL server.

A PostgreSQL URL names the server to use (its database part is only where we connect to create
ours); the run gets a new, empty database that is dropped afterwards, so runs never see each
other's rows and the server is left as it was.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


@dataclass(frozen=True)
class Database:
    url: str
    kind: str  # "sqlite" or "postgresql"
    server_version: str


def _psycopg_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def database_kind(url: str) -> str:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return "sqlite"
    if backend in ("postgresql", "postgres"):
        return "postgresql"
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:////abs/path.db or postgresql://...")


@contextmanager
def fresh_database(url: str | None, temp_dir: Path) -> Iterator[Database]:
    """`url` None: a new SQLite file in `temp_dir`. An existing SQLite file is refused rather than reused."""
    if url is None:
        url = f"sqlite:///{temp_dir / 'bench.db'}"
    if database_kind(url) == "sqlite":
        path = make_url(url).database
        if not path or path == ":memory:":
            raise ValueError("the server runs in its own process: give SQLite a file path")
        if Path(path).exists():
            raise ValueError(f"{path} already exists: the benchmark needs an empty database")
        yield Database(url, "sqlite", sqlite3.sqlite_version)
        return
    with _postgres_database(url) as database:
        yield database


@contextmanager
def _postgres_database(server_url: str) -> Iterator[Database]:
    name = f"engine_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_psycopg_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            version = str(conn.execute(text("SHOW server_version")).scalar_one())
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            run_url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
            yield Database(run_url, "postgresql", version)
        finally:
            with admin.connect() as conn:
                # FORCE: a server that was killed may leave sessions behind.
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
