"""Connecting to the database chosen by URL: SQLite (the embedded default) or PostgreSQL."""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

SQLITE_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# WAL pages after which the writer's commit finishes the checkpoint itself (SQLite's default; 4 MB of 4 KB pages).
WAL_AUTOCHECKPOINT_PAGES = 1000


def normalise_url(url: str) -> str:
    """Accepts postgresql:// and postgres:// URLs and selects the psycopg 3 driver for them."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_database_engines(url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 8) -> tuple[Engine, Engine]:
    """Returns (writer, reader) engines. On PostgreSQL they are the same; SQLite needs two kinds of BEGIN."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, sqlite_synchronous, writer=True), _sqlite_engine(url, sqlite_synchronous)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://")
    engine = create_engine(
        url,
        # A batch stuck behind another replica's lock or a half-open socket fails (and is retried) instead
        # of hanging the server, its shutdown included.
        connect_args={"options": "-c lock_timeout=10000 -c statement_timeout=60000"},
        pool_size=pool_size,
        max_overflow=pool_size,
        # A connection killed by the server (restart, pg_terminate_backend) is noticed before use.
        pool_pre_ping=True,
        pool_recycle=1800,
    )
    return engine, engine


def _sqlite_engine(url: str, synchronous: str, *, writer: bool = False) -> Engine:
    if synchronous.upper() not in SQLITE_SYNCHRONOUS_MODES:
        raise ValueError(f"sqlite synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS_MODES)}")
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        pool_size=1 if writer else 4,
        max_overflow=0 if writer else 8,
        connect_args={"check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy issue BEGIN itself, so a transaction really is one transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        if writer:
            # The WAL starts over from its beginning only when a write transaction begins with every frame already
            # copied into the database file (and no reader still on WAL frames). Store.checkpoint copies them from
            # another connection, off the commit path, but under continuous writes new frames always arrive while
            # it runs, so the WAL would grow without end (57 MB in a 2.5 s chain-1000). With this, every commit
            # that leaves WAL_AUTOCHECKPOINT_PAGES or more in the WAL also checkpoints on this connection (inside
            # the commit, on the database thread), finishing what the background one left, so the next
            # transaction restarts the WAL: it stays near that size (4-5 MB). Measured on chain-1000, the mean
            # commit, these checkpoints included, went from 0.39-0.49 ms to 0.35 ms (less fsync'd file growth).
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # The writer takes the write lock at BEGIN, so it is never upgraded mid-transaction (SQLITE_BUSY);
        # readers see a consistent WAL snapshot without blocking it.
        # Straight to the driver: SQLAlchemy's execution path costs more than the BEGIN itself. Its errors (a
        # locked database) are raised as SQLAlchemy's, which the engine's batch retry recognises.
        statement = "BEGIN IMMEDIATE" if writer else "BEGIN"
        try:
            connection.connection.driver_connection.execute(statement)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc

    return engine


class DatabaseInUse(Exception):
    """Another engine server already owns this SQLite file."""


class SqliteLock:
    """An exclusive lock beside a SQLite file, held while the server runs.

    SQLite is the single-node default: two servers on one file would each cache pipelines the other changes.
    """

    def __init__(self, url: str) -> None:
        parsed = make_url(normalise_url(url))
        database = parsed.database if parsed.get_backend_name() == "sqlite" else None
        self.path = Path(f"{database}.lock") if database and database != ":memory:" else None
        self._file: Any = None

    def acquire(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise DatabaseInUse(
                f"another engine server is already using {self.path.with_suffix('')}: SQLite serves one server; "
                "run several replicas on PostgreSQL instead"
            ) from None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
