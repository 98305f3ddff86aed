"""Repository over the schema: the statements the engine runs, on SQLAlchemy Core.

All methods are synchronous and take an open connection, so the caller decides what shares one
transaction (the engine puts a whole batch of events in one). Hot-path writes go through `write`,
which issues one executemany per kind of change.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BindParameter, Connection, Row, TextClause, bindparam, func, select, text, update
from sqlalchemy.exc import DBAPIError

from storage.database import create_database_engines
from storage.migrate import prepare
from storage.schema import (
    CANCELLED,
    CLAIMED,
    DONE,
    FIRED,
    PENDING,
    QUEUED,
    node_histories,
    node_states,
    pipeline_trees,
    pipelines,
    tasks,
    timers,
)


@dataclass
class WriteSet:
    """Everything one batch changes; written with one statement per list."""

    new_pipelines: list[dict[str, Any]] = field(default_factory=list)
    # {"pipeline_id", "tree_json"}: the trees of new_pipelines.
    new_trees: list[dict[str, Any]] = field(default_factory=list)
    pipeline_updates: list[dict[str, Any]] = field(default_factory=list)
    node_upserts: list[dict[str, Any]] = field(default_factory=list)
    history_inserts: list[dict[str, Any]] = field(default_factory=list)
    task_inserts: list[dict[str, Any]] = field(default_factory=list)
    # {"b_id", "completed_claim", "result_kind"}: a claimed task whose result was applied.
    task_completions: list[dict[str, Any]] = field(default_factory=list)
    # {"pipeline_id", "node_id", "node_version", "reason"}: open tasks of a node attempt to withdraw.
    task_cancels: list[dict[str, Any]] = field(default_factory=list)
    # {"b_id", "b_claim_no", "lease_deadline", "progress_json"}
    lease_extensions: list[dict[str, Any]] = field(default_factory=list)
    # {"b_id", "b_claim_no"}: claimed tasks that never reached a worker (the poll was gone).
    task_releases: list[dict[str, Any]] = field(default_factory=list)
    # {"b_pipeline_id", "b_node_id"}: node states that are gone (a lifted pause appointment).
    node_deletes: list[dict[str, Any]] = field(default_factory=list)
    timer_inserts: list[dict[str, Any]] = field(default_factory=list)


TASK_COLUMNS = (
    tasks.c.id,
    tasks.c.pipeline_id,
    tasks.c.node_id,
    tasks.c.node_version,
    tasks.c.kind,
    tasks.c.component_code,
    tasks.c.component_version,
    tasks.c.status,
    tasks.c.available_at,
    tasks.c.lease_deadline,
    tasks.c.claim_no,
    tasks.c.claim_secret,
    tasks.c.completed_claim,
    tasks.c.result_kind,
    tasks.c.cancel_reason,
    tasks.c.inputs_json,
    tasks.c.outputs_json,
    tasks.c.callback_data_json,
    tasks.c.progress_json,
    tasks.c.loop,
    tasks.c.inner_loop,
    tasks.c.retry,
    tasks.c.schedule_times,
)


@dataclass
class _DriverPlan:
    """A statement compiled for the driver's own execute: SQL with positional placeholders, a function picking
    the values out of the caller's parameters, and the row type of a query (made at its first execution)."""

    sql: str
    values: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    row_type: Any = None


class Store:
    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 8) -> None:
        self.writer, self.reader = create_database_engines(
            url, sqlite_synchronous=sqlite_synchronous, pool_size=pool_size
        )
        self.dialect = self.writer.dialect.name
        self._driver_dialect = _positional_dialect(self.writer.dialect)
        self._driver_error: type[Exception] = self.writer.dialect.loaded_dbapi.Error
        self._node_upsert = self._build_node_upsert()
        self._build_statements()
        self._driver_plans: dict[tuple[int, tuple[tuple[str, int], ...]], _DriverPlan | None] = {}
        # psycopg has a pipeline mode (see `transaction`), and gives values as SQLAlchemy would (SQLite's driver
        # would give 0/1 for booleans): a batch's reads go straight to it, which they must in a pipeline.
        self._pipeline_mode = self.writer.dialect.driver == "psycopg"

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def prepare_schema(self) -> str:
        """Creates the schema in an empty database; raises SchemaMismatch when it is at another revision."""
        return prepare(self.writer)

    def checkpoint(self) -> None:
        """SQLite: copies committed WAL pages into the database file without waiting for the writer or readers.

        Done here, on a reader connection, so the writer's commits pay for little of it: the writer's own
        checkpoint (see WAL_AUTOCHECKPOINT_PAGES) then finds most pages copied already.
        """
        if not self.is_sqlite:
            return
        raw = self.reader.raw_connection()
        try:
            raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
        finally:
            raw.close()

    def dispose(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()

    def _build_node_upsert(self) -> TextClause:
        """INSERT ... ON CONFLICT DO UPDATE, identical on SQLite and PostgreSQL.

        Written as text because SQLAlchemy recompiles its dialect upsert constructs on every execution.
        """
        columns = [c.name for c in node_states.c]
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if not node_states.c[c].primary_key)
        return text(
            f"INSERT INTO node_states ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)}) "
            f"ON CONFLICT (pipeline_id, node_id) DO UPDATE SET {updates}"
        )

    def _build_statements(self) -> None:
        """Hot-path statements are built once: SQLAlchemy then reuses their cache keys and compiled SQL."""
        lock = not self.is_sqlite
        ids: BindParameter[Any] = bindparam("ids", expanding=True)
        versions = select(pipelines.c.id, pipelines.c.row_version).where(pipelines.c.id.in_(ids))
        self._pipeline_versions = versions.order_by(pipelines.c.id).with_for_update() if lock else versions
        self._load_pipeline = (
            select(pipelines, pipeline_trees.c.tree_json)
            .join(pipeline_trees, pipeline_trees.c.pipeline_id == pipelines.c.id)
            .where(pipelines.c.id == bindparam("id"))
        )
        self._load_nodes = select(node_states).where(node_states.c.pipeline_id == bindparam("id"))
        self._existing_ids = select(pipelines.c.id).where(pipelines.c.id.in_(ids))
        self._by_key = select(pipelines.c.idempotency_key, pipelines.c.id).where(
            pipelines.c.idempotency_key.in_(bindparam("keys", expanding=True))
        )
        # PostgreSQL: lock the reported tasks, so a replica's reaper or claim cannot change them under this batch
        # (and a duplicate report on another replica waits, then sees DONE).
        load_tasks = select(*TASK_COLUMNS).where(tasks.c.id.in_(ids)).order_by(tasks.c.id)
        self._load_tasks = load_tasks.with_for_update() if lock else load_tasks
        candidates = (
            select(tasks.c.id)
            .where(
                tasks.c.status == QUEUED,
                tasks.c.component_code.in_(bindparam("codes", expanding=True)),
                tasks.c.available_at <= bindparam("now"),
            )
            .order_by(tasks.c.available_at)
            .limit(bindparam("limit"))
        )
        if lock:
            candidates = candidates.with_for_update(skip_locked=True)
        self._claim = (
            update(tasks)
            .where(tasks.c.id.in_(candidates.scalar_subquery()))
            .values(
                status=CLAIMED,
                claim_no=tasks.c.claim_no + 1,
                claim_secret=bindparam("secret"),
                worker_id=bindparam("worker_id"),
                lease_deadline=bindparam("lease_deadline"),
            )
            .returning(*TASK_COLUMNS)
        )
        self._requeue = (
            update(tasks)
            .where(tasks.c.status == CLAIMED, tasks.c.lease_deadline < bindparam("now"))
            .values(status=QUEUED, available_at=bindparam("now"), worker_id="")
            .returning(tasks.c.id, tasks.c.pipeline_id, tasks.c.node_id, tasks.c.component_code)
        )
        self._update_pipeline = (
            update(pipelines)
            .where(pipelines.c.id == bindparam("b_id"))
            .values(
                state=bindparam("state"),
                row_version=bindparam("row_version"),
                version_seq=bindparam("version_seq"),
                finished_at=bindparam("finished_at"),
                runtime_json=bindparam("runtime_json"),
            )
        )
        self._complete_tasks = (
            update(tasks)
            .where(tasks.c.id == bindparam("b_id"))
            .values(status=DONE, completed_claim=bindparam("completed_claim"), result_kind=bindparam("result_kind"))
        )
        self._cancel_tasks = (
            update(tasks)
            .where(
                tasks.c.pipeline_id == bindparam("b_pipeline_id"),
                tasks.c.node_id == bindparam("b_node_id"),
                tasks.c.node_version == bindparam("b_node_version"),
                tasks.c.status <= CLAIMED,  # queued or claimed (an IN list cannot go through executemany)
            )
            .values(status=CANCELLED, cancel_reason=bindparam("reason"))
        )
        self._extend_leases = (
            update(tasks)
            .where(
                tasks.c.id == bindparam("b_id"),
                tasks.c.claim_no == bindparam("b_claim_no"),
                tasks.c.status == CLAIMED,
            )
            .values(lease_deadline=bindparam("lease_deadline"), progress_json=bindparam("progress_json"))
        )
        self._release_tasks = (
            update(tasks)
            .where(
                tasks.c.id == bindparam("b_id"),
                tasks.c.claim_no == bindparam("b_claim_no"),
                tasks.c.status == CLAIMED,
            )
            .values(status=QUEUED, claim_no=tasks.c.claim_no - 1, lease_deadline=0, worker_id="")
        )
        due_timers = (
            select(timers.c.id)
            .where(timers.c.status == PENDING, timers.c.fire_at <= bindparam("now"))
            .order_by(timers.c.fire_at)
            .limit(bindparam("limit"))
        )
        if lock:
            due_timers = due_timers.with_for_update(skip_locked=True)
        self._fire_timers = (
            update(timers)
            .where(timers.c.id.in_(due_timers.scalar_subquery()))
            .values(status=FIRED)
            .returning(timers.c.pipeline_id, timers.c.node_id, timers.c.node_version, timers.c.kind, timers.c.fire_at)
        )
        self._next_timer = select(func.min(timers.c.fire_at)).where(timers.c.status == PENDING)
        self._delete_nodes = node_states.delete().where(
            node_states.c.pipeline_id == bindparam("b_pipeline_id"), node_states.c.node_id == bindparam("b_node_id")
        )
        self._insert_timers = timers.insert()
        self._insert_pipelines = pipelines.insert()
        # An upsert: a tree left behind by a pipeline deleted without it (an older version's purge) must not make
        # the start of a new pipeline with the same client-chosen id fail.
        self._insert_trees = text(
            "INSERT INTO pipeline_trees (pipeline_id, tree_json) VALUES (:pipeline_id, :tree_json) "
            "ON CONFLICT (pipeline_id) DO UPDATE SET tree_json = excluded.tree_json"
        )
        self._insert_histories = node_histories.insert()
        self._insert_tasks = tasks.insert()

    # ------------------------------------------------------------ pipelines

    def pipeline_versions(self, conn: Connection, pipeline_ids: Iterable[str]) -> dict[str, int]:
        """Current row versions, locking the rows on PostgreSQL so replicas apply changes one at a time."""
        ids = sorted(set(pipeline_ids))
        if not ids:
            return {}
        return {row.id: row.row_version for row in self._query(conn, self._pipeline_versions, {"ids": ids})}

    def load_pipeline(self, conn: Connection, pipeline_id: str) -> Row[Any] | None:
        rows = self._read(conn, self._load_pipeline, {"id": pipeline_id})
        return rows[0] if rows else None

    def load_nodes(self, conn: Connection, pipeline_id: str) -> Sequence[Row[Any]]:
        return self._read(conn, self._load_nodes, {"id": pipeline_id})

    def existing_pipeline_ids(self, conn: Connection, pipeline_ids: Iterable[str]) -> set[str]:
        ids = list(set(pipeline_ids))
        if not ids:
            return set()
        return {row.id for row in self._query(conn, self._existing_ids, {"ids": ids})}

    def pipelines_by_idempotency_key(self, conn: Connection, keys: Iterable[str]) -> dict[str, str]:
        keys = list(set(keys))
        if not keys:
            return {}
        return {row.idempotency_key: row.id for row in self._query(conn, self._by_key, {"keys": keys})}

    def list_pipelines(
        self, conn: Connection, *, states: Sequence[str], limit: int, after: tuple[int, str] | None
    ) -> Sequence[Row[Any]]:
        query = select(
            pipelines.c.id,
            pipelines.c.name,
            pipelines.c.state,
            pipelines.c.created_at,
            pipelines.c.finished_at,
        )
        if states:
            query = query.where(pipelines.c.state.in_(list(states)))
        if after is not None:
            created_at, pipeline_id = after
            query = query.where(
                (pipelines.c.created_at > created_at)
                | ((pipelines.c.created_at == created_at) & (pipelines.c.id > pipeline_id))
            )
        return conn.execute(query.order_by(pipelines.c.created_at, pipelines.c.id).limit(limit)).all()

    def count_pipelines_by_state(self, conn: Connection) -> dict[str, int]:
        """For the pipelines-by-state gauge (read at scrape time, on a reader connection)."""
        query = select(pipelines.c.state, func.count()).group_by(pipelines.c.state)
        return {state: count for state, count in conn.execute(query)}

    def load_histories(self, conn: Connection, pipeline_id: str, node_id: str) -> Sequence[Row[Any]]:
        return conn.execute(
            select(node_histories)
            .where(node_histories.c.pipeline_id == pipeline_id, node_histories.c.node_id == node_id)
            .order_by(node_histories.c.id)
        ).all()

    # ------------------------------------------------------------ tasks

    def load_tasks(self, conn: Connection, task_ids: Iterable[str]) -> dict[str, Row[Any]]:
        ids = list(set(task_ids))
        if not ids:
            return {}
        return {row.id: row for row in self._query(conn, self._load_tasks, {"ids": ids})}

    def claim(
        self,
        conn: Connection,
        *,
        codes: Sequence[str],
        limit: int,
        now: int,
        lease_deadline: int,
        worker_id: str,
        secret: str,
    ) -> list[Row[Any]]:
        """Claims up to `limit` available tasks of these codes, oldest first.

        PostgreSQL skips rows other replicas hold locked (FOR UPDATE SKIP LOCKED); SQLite has one writer.
        """
        parameters = {
            "codes": list(codes),
            "now": now,
            "limit": limit,
            "secret": secret,
            "worker_id": worker_id,
            "lease_deadline": lease_deadline,
        }
        rows = self._query(conn, self._claim, parameters)
        rows.sort(key=lambda row: row.available_at)
        return rows

    def requeue_expired_leases(self, conn: Connection, now: int) -> list[Row[Any]]:
        """Offers again every claimed task whose lease ran out; returns (id, pipeline_id, node_id, component_code)
        of each."""
        return self._query(conn, self._requeue, {"now": now})

    def fire_due_timers(self, conn: Connection, now: int, limit: int = 500) -> list[Row[Any]]:
        """Marks due timers fired and returns them; the caller applies them in the same transaction."""
        rows = self._query(conn, self._fire_timers, {"now": now, "limit": limit})
        rows.sort(key=lambda row: row.fire_at)
        return rows

    def next_timer_at(self, conn: Connection) -> int | None:
        next_at: int | None = self._read(conn, self._next_timer, {})[0][0]
        return next_at

    def purge_batch(self, conn: Connection, finished_before: int, batch_size: int) -> int:
        """Deletes up to `batch_size` FINISHED or REVOKED pipelines that ended before `finished_before`, with
        everything they own, in one short transaction. Returns how many (0 when none are left)."""
        with conn.begin():
            ids = list(
                conn.scalars(
                    select(pipelines.c.id)
                    .where(pipelines.c.state.in_(["FINISHED", "REVOKED"]), pipelines.c.finished_at < finished_before)
                    .limit(batch_size)
                )
            )
            if ids:
                for table in (node_states, node_histories, tasks, timers, pipeline_trees):
                    conn.execute(table.delete().where(table.c.pipeline_id.in_(ids)))
                conn.execute(pipelines.delete().where(pipelines.c.id.in_(ids)))
        return len(ids)

    def purge_finished(self, finished_before: int, batch_size: int = 500) -> int:
        """Purges batch after batch (for the CLI, with no server running); returns how many in all."""
        purged = 0
        with self.writer.connect() as conn:
            while count := self.purge_batch(conn, finished_before, batch_size):
                purged += count
        return purged

    def earliest_pending_task(self, conn: Connection) -> int | None:
        earliest: int | None = conn.scalar(select(func.min(tasks.c.available_at)).where(tasks.c.status == QUEUED))
        return earliest

    # ------------------------------------------------------------ the batch write

    @contextlib.contextmanager
    def transaction(self, conn: Connection) -> Iterator[None]:
        """One transaction, committed at the end of the block and rolled back if it raises.

        On PostgreSQL its statements go out in psycopg's pipeline mode: each is sent without waiting for the one
        before, and reading a query's rows waits once for everything sent until then; the COMMIT goes out with
        the block's last statements. A report's batch so waits for the server 5 times instead of 9 (the writes
        of four kinds of rows go with the claim that follows them, and COMMIT with the pipeline's end), and each
        wait is a round trip to another process: ~0.2 ms on a busy machine. SQLite runs in this process (and
        another PostgreSQL driver has no pipeline mode): a plain transaction. Inside, an error may surface at a
        later statement than the one that caused it.
        """
        with conn.begin():
            if not self._pipeline_mode:
                yield
                return
            driver = conn.connection.driver_connection
            # The pipeline ends before SQLAlchemy's transaction does, so a rollback runs outside it (in an aborted
            # pipeline it would fail itself and hide the error that caused it). COMMIT goes to the driver, inside:
            # it then leaves with the pipeline's closing Sync, one wait; SQLAlchemy's own commit finds the
            # connection idle and does nothing, and a COMMIT that fails still gets SQLAlchemy's rollback.
            with self._driver_errors("(a pipelined statement)", (), driver), driver.pipeline():  # type: ignore[union-attr]
                yield
                driver.cursor().execute("COMMIT")  # type: ignore[union-attr]

    def write(self, conn: Connection, changes: WriteSet) -> None:
        for statement, rows in (
            (self._insert_pipelines, changes.new_pipelines),
            (self._insert_trees, changes.new_trees),
            (self._update_pipeline, changes.pipeline_updates),
            (self._node_upsert, changes.node_upserts),
            (self._insert_histories, changes.history_inserts),
            (self._complete_tasks, changes.task_completions),
            # Cancels run before inserts: a task offered in the same batch is never withdrawn by mistake.
            (self._cancel_tasks, changes.task_cancels),
            (self._insert_tasks, changes.task_inserts),
            (self._extend_leases, changes.lease_extensions),
            (self._release_tasks, changes.task_releases),
            (self._delete_nodes, changes.node_deletes),
            (self._insert_timers, changes.timer_inserts),
        ):
            if rows:
                self._executemany(conn, statement, rows)

    def _executemany(self, conn: Connection, statement: Any, rows: list[dict[str, Any]]) -> None:
        """One statement for many rows. The compiled SQL goes straight to the driver's executemany: SQLAlchemy's
        per-row parameter processing cost about as much as the database itself on the hot path."""
        plan = self._driver_plan(statement, rows[0])
        if plan is None:
            self._outside_a_pipeline(conn, statement)
            conn.execute(statement, rows)
            return
        values = [plan.values(row) for row in rows]
        driver = conn.connection.driver_connection
        with self._driver_errors(plan.sql, values, driver):
            driver.cursor().executemany(plan.sql, values)  # type: ignore[union-attr]

    def _query(self, conn: Connection, statement: Any, parameters: Mapping[str, Any]) -> list[Any]:
        """All rows of a SELECT or an UPDATE ... RETURNING as named tuples, straight from the driver: SQLAlchemy's
        execution cost ten times SQLite's own work for these small queries."""
        plan = self._driver_plan(statement, parameters)
        if plan is None:
            self._outside_a_pipeline(conn, statement)
            return list(conn.execute(statement, parameters))
        values = plan.values(parameters)
        driver = conn.connection.driver_connection
        with self._driver_errors(plan.sql, values, driver):
            cursor = driver.cursor()  # type: ignore[union-attr]
            cursor.execute(plan.sql, values)
            rows = cursor.fetchall()
        if plan.row_type is None:
            plan.row_type = namedtuple("Row", [column[0] for column in cursor.description])  # type: ignore[misc]
        return [plan.row_type._make(row) for row in rows]

    def _read(self, conn: Connection, statement: Any, parameters: Mapping[str, Any]) -> list[Any]:
        """Rows of a read that is not on the hot path but may run inside a batch: straight from psycopg, which
        a pipelined batch needs (see `transaction`); through SQLAlchemy otherwise, whose types SQLite needs."""
        if self._pipeline_mode:
            return self._query(conn, statement, parameters)
        return list(conn.execute(statement, parameters))

    def _driver_plan(self, statement: Any, parameters: Mapping[str, Any]) -> _DriverPlan | None:
        """Compiled once per statement and shape of parameters (their names, and the length of each list, whose
        items become one placeholder each); None when SQLAlchemy must run the statement."""
        shape = tuple((name, len(value) if isinstance(value, list) else -1) for name, value in parameters.items())
        key = (id(statement), shape)
        if key in self._driver_plans:
            return self._driver_plans[key]
        if self._driver_dialect is None:
            return None
        # column_keys: an INSERT or UPDATE names just the columns given (the others keep their defaults).
        compiled = statement.compile(dialect=self._driver_dialect, column_keys=list(parameters))
        expanded = compiled.construct_expanded_state(dict(parameters))
        # Where each placeholder's value comes from: a parameter, an item of a list parameter, or the statement
        # (a value it binds itself, or the fixed default of a column an INSERT leaves out).
        sources: list[tuple[str, Any, int]] = []
        for name in expanded.positiontup or ():
            list_name, _, index = name.rpartition("_")
            if name in parameters and not isinstance(parameters[name], list):
                sources.append(("parameter", name, 0))
            elif isinstance(parameters.get(list_name), list) and index.isdigit():
                sources.append(("item", list_name, int(index) - 1))
            else:
                constant = expanded.parameters.get(name)
                sources.append(("constant", _column_default(statement, name) if constant is None else constant, 0))

        def values(given: Mapping[str, Any]) -> tuple[Any, ...]:
            return tuple(
                given[key] if kind == "parameter" else given[key][index] if kind == "item" else key
                for kind, key, index in sources
            )

        if len(sources) > 1 and all(kind == "parameter" for kind, _, _ in sources):
            # The common case of a batch write's rows, done in C: an executemany calls this once per row.
            values = operator.itemgetter(*(key for _, key, _ in sources))  # type: ignore[assignment]

        plan: _DriverPlan | None = _DriverPlan(expanded.statement, values)
        # The plan must give exactly what SQLAlchemy would bind; anything unusual goes through SQLAlchemy.
        given = values(parameters)
        if expanded.positiontup is None or any(
            value is None if kind == "constant" else value != expanded.parameters[name]
            for (kind, _, _), value, name in zip(sources, given, expanded.positiontup, strict=True)
        ):
            plan = None
        self._driver_plans[key] = plan
        return plan

    def _outside_a_pipeline(self, conn: Connection, statement: Any) -> None:
        """SQLAlchemy cannot run a statement in psycopg's pipeline mode (it reads a result's columns before the
        result has arrived, and takes a query for one without rows): refuse rather than lose rows."""
        if self._pipeline_mode and conn.connection.driver_connection.pgconn.pipeline_status:  # type: ignore[union-attr]
            raise RuntimeError(f"this statement cannot run inside Store.transaction(): {statement}")

    @contextlib.contextmanager
    def _driver_errors(self, sql: str, values: Any, driver_connection: Any) -> Iterator[None]:
        """Driver errors raised as SQLAlchemy's, as if SQLAlchemy had run the statement: the engine's retry
        logic (locked database, lost connection, a replica's concurrent insert) tells them apart by those types."""
        try:
            yield
        except self._driver_error as exc:
            disconnected = self.writer.dialect.is_disconnect(exc, driver_connection, None)  # type: ignore[arg-type]
            raise DBAPIError.instance(
                sql, values, exc, self._driver_error, connection_invalidated=disconnected
            ) from exc


def _column_default(statement: Any, name: str) -> Any:
    """An INSERT's fixed default for a column the rows leave out (None when it has none, or a computed one)."""
    table = getattr(statement, "table", None)
    column = table.c.get(name) if table is not None else None
    default = column.default if column is not None else None
    return default.arg if default is not None and default.is_scalar else None


def _positional_dialect(dialect: Any) -> Any:
    """The dialect to compile hot-path statements with for the driver's own execute: SQLite's as it is
    (qmark), psycopg's switched to positional %s; None for other drivers (SQLAlchemy runs everything)."""
    if dialect.driver == "pysqlite":
        return dialect
    if dialect.driver == "psycopg":
        positional = copy.copy(dialect)
        positional.paramstyle = "format"
        positional.positional = True
        return positional
    return None
