"""The database of one benchmark run: a fresh SQLite file, or a fresh database on a PostgreSQL server.

A PostgreSQL URL names the server to use (its database part is only where we connect to create
ours); the run gets a new, empty database that is dropped afterwards, so runs never see each
other's rows and the server is left as it was.

A PostgreSQL server with autovacuum off (as on this project's CI machines) never clears the dead rows that
every update leaves: each measured run then reads through all earlier runs' dead rows, and `sustained` fell
from 1,459 to 1,011 pipelines/s (and 1,026 to 510) from its first run to its second. `vacuum_if_needed`
clears them before each measured run (autovacuum would, on its own schedule), and says so.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.runtime import progress


@dataclass(frozen=True)
class Database:
    url: str
    kind: str  # "sqlite" or "postgresql"
    server_version: str
    autovacuum: bool | None = None
    """PostgreSQL: whether the server vacuums by itself; None for SQLite."""

    @property
    def vacuums_between_runs(self) -> bool:
        return self.kind == "postgresql" and not self.autovacuum

    def vacuum_if_needed(self) -> None:
        """VACUUM (ANALYZE) of the whole run database when the server's autovacuum is off."""
        if not self.vacuums_between_runs:
            return
        began = time.monotonic()
        engine = create_engine(_psycopg_url(self.url), isolation_level="AUTOCOMMIT")  # VACUUM refuses transactions
        try:
            with engine.connect() as conn:
                conn.execute(text("VACUUM (ANALYZE)"))
        finally:
            engine.dispose()
        progress(f"vacuumed the database in {time.monotonic() - began:.2f} s")


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
            autovacuum = conn.execute(text("SHOW autovacuum")).scalar_one() == "on"
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            run_url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
            yield Database(run_url, "postgresql", version, autovacuum)
        finally:
            with admin.connect() as conn:
                # FORCE: a server that was killed may leave sessions behind.
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
