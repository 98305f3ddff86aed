"""The bamboo-engine peer: bamboo's benchmark shapes, built with `bamboo_engine.builder`, run by
bamboo-pipeline's Celery workers (Django, Redis broker) on a fresh SQLite or PostgreSQL database.

    .venv-peers/bin/python bench/peers/bamboo_runner.py                        # both scenarios, SQLite
    .venv-peers/bin/python bench/peers/bamboo_runner.py --db postgresql://postgres@127.0.0.1:5432/postgres
    .venv-peers/bin/python bench/peers/bamboo_runner.py --scenario fanout-1000 --repeat 1

Creates the database (a SQLite file in a temp dir, or `bamboo_bench_<hex>` on the PostgreSQL server,
dropped afterwards), applies bamboo's migrations with `manage.py migrate`, starts the workers, runs
each scenario, stops the workers (also on an error or Ctrl-C) and prints one JSON document on stdout
in the shape of `python -m bench`'s; progress goes to stderr. A run is timed from just before the
first `run_pipeline` call to the latest `archived_time` (finish time) of the pipelines in bamboo's
State table.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

if __package__ in (None, ""):
    # Run as a script from .venv-peers: make `bench.*` importable without installing the project.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.common import (
    PEERS_DIR,
    ChildProcess,
    PeerScenario,
    RunResult,
    check_alive,
    machine_info,
    measure,
    millis_between,
    positive_int,
    progress,
    run_main,
    started_at,
    wait_until,
)

SITE_DIR = PEERS_DIR / "bamboo_site"
BROKER_URL = os.environ.get("BAMBOO_BENCH_BROKER_URL", "redis://127.0.0.1:6379/6")
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
PACKAGES = ("bamboo-engine", "bamboo-pipeline", "Django", "celery", "kombu", "redis", "psycopg")
NOOP = "noop"  # the component of bamboo_site/noop_plugins

PIPELINES = 100
FANOUT_BRANCHES = 100
BRANCH_LENGTH = 10
RUN_TIMEOUT = 600.0
START_TIMEOUT = 60.0
# How often we look for the end: it changes only when we notice it, not the figures, which come
# from bamboo's own finish times.
POLL_INTERVAL = 0.25

# The fastest worker set-up measured on the 2-core machine (see bench/peers/README.md).
DEFAULT_POOL = "prefork"
DEFAULT_WORKERS = 1
DEFAULT_CONCURRENCY = 4
DEFAULT_PREFETCH = 4


# -- the database ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    url: str
    kind: str  # "sqlite" or "postgresql"
    server_version: str
    autovacuum: bool | None = None

    @property
    def vacuums_between_runs(self) -> bool:
        return self.kind == "postgresql" and not self.autovacuum

    def vacuum_if_needed(self) -> None:
        """As bench/database.py does for the engine: with autovacuum off, dead rows of earlier runs are cleared."""
        if self.vacuums_between_runs:
            import psycopg

            began = time.monotonic()
            with psycopg.connect(self.url, autocommit=True) as connection:
                connection.execute("VACUUM (ANALYZE)")
            progress(f"vacuumed the database in {time.monotonic() - began:.2f} s")


@contextmanager
def fresh_database(db: str, temp_dir: Path) -> Iterator[Database]:
    """`sqlite`: a new file in `temp_dir`; a PostgreSQL URL: a new database on that server, dropped after."""
    if db == "sqlite":
        yield Database(f"sqlite:///{temp_dir / 'bamboo.db'}", "sqlite", sqlite3.sqlite_version)
        return
    import psycopg

    parts = urlsplit(db)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"--db must be 'sqlite' or a postgresql:// URL, got {db!r}")
    name = f"bamboo_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(db, autocommit=True) as admin:
        version = str(admin.execute("SHOW server_version").fetchone()[0])
        autovacuum = admin.execute("SHOW autovacuum").fetchone()[0] == "on"
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield Database(urlunsplit(parts._replace(path=f"/{name}")), "postgresql", version, autovacuum)
    finally:
        with psycopg.connect(db, autocommit=True) as admin:
            # FORCE: a worker that was killed may leave sessions behind.
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _site_env(database: Database) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(SITE_DIR),
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "bamboo_site.settings",
        "BAMBOO_BENCH_DATABASE_URL": database.url,
        "BAMBOO_BENCH_BROKER_URL": BROKER_URL,
    }


def migrate(database: Database, log_dir: Path) -> None:
    """bamboo's own schema, by `manage.py migrate` (run as manage.py, so bamboo skips component set-up)."""
    log_path = log_dir / "migrate.log"
    with log_path.open("wb") as log:
        finished = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--no-input", "-v", "1"],
            cwd=SITE_DIR,
            env=_site_env(database),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if finished.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"manage.py migrate failed ({finished.returncode}):\n{tail}")


def set_sqlite_journal_mode(database: Database, mode: str) -> None:
    # The journal mode is kept in the file, so every process that opens it afterwards uses it.
    with sqlite3.connect(database.url.removeprefix("sqlite:///")) as conn:
        conn.execute(f"PRAGMA journal_mode={mode}")


def setup_django(database: Database) -> None:
    """This process becomes a bamboo client: Django set up on the run's database, bamboo's Celery app."""
    site_env = _site_env(database)
    for key in ("DJANGO_SETTINGS_MODULE", "BAMBOO_BENCH_DATABASE_URL", "BAMBOO_BENCH_BROKER_URL"):
        os.environ[key] = site_env[key]
    sys.path.insert(0, str(SITE_DIR))
    import django

    django.setup()


# -- the workers ----------------------------------------------------------------------------------


class BambooWorkers:
    """bamboo-pipeline's Celery workers, serving its execute and schedule queues."""

    def __init__(self, args: argparse.Namespace, database: Database, log_dir: Path) -> None:
        env = _site_env(database)
        self.processes = [
            ChildProcess(
                f"bamboo worker {n}", _worker_command(args, n), log_dir / f"worker-{n}.log", cwd=SITE_DIR, env=env
            )
            for n in range(args.workers)
        ]

    def check_alive(self) -> None:
        check_alive(self.processes)

    def wait_until_ready(self) -> None:
        from bamboo_site.celery_app import app

        def all_answer() -> bool:
            self.check_alive()
            return len(app.control.ping(timeout=0.5)) >= len(self.processes)

        wait_until(all_answer, timeout=START_TIMEOUT, interval=0.1, what="every bamboo worker answering a ping")


def _worker_command(args: argparse.Namespace, number: int) -> list[str]:
    from pipeline.eri.celery.queues import QueueResolver

    queues = ",".join(route["queue"] for route in QueueResolver("").routes_config().values())
    command = [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "bamboo_site",
        "worker",
        "--pool",
        args.pool,
        "--queues",
        queues,
        "--hostname",
        f"bamboo{number}@%h",
        "--loglevel",
        "WARNING",
        "--prefetch-multiplier",
        str(args.prefetch_multiplier),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if args.pool != "solo":
        command += ["--concurrency", str(args.concurrency)]
    return command


@contextmanager
def running_workers(args: argparse.Namespace, database: Database, log_dir: Path) -> Iterator[BambooWorkers]:
    workers = BambooWorkers(args, database, log_dir)
    with ExitStack() as stack:
        # Registered before each start, so a failure or Ctrl-C half-way still stops what did start.
        for process in workers.processes:
            stack.callback(process.stop)
            process.start()
        workers.wait_until_ready()
        yield workers


# -- the pipelines --------------------------------------------------------------------------------


def _noop(i: int) -> Any:
    from bamboo_engine.builder import ServiceActivity, Var

    activity = ServiceActivity(component_code=NOOP)
    activity.component.inputs.i = Var(type=Var.PLAIN, value=i)
    return activity


def _noop_rendering_constants() -> Any:
    """An activity whose two inputs are rendered from the pipeline's variables, as in bamboo's benchmark."""
    from bamboo_engine.builder import ServiceActivity, Var

    activity = ServiceActivity(component_code=NOOP)
    for key in CONSTANTS:
        setattr(activity.component.inputs, key, Var(type=Var.SPLICE, value=_variable(key)))
    return activity


CONSTANTS = {"constant_1": "value_1", "constant_2": "value_2"}


def _variable(key: str) -> str:
    return "${" + key + "}"


BAMBOO_17_ACTIVITIES_RUN = 8  # a1, a2, s1, s2, b1-b3, and the one exclusive branch taken


def bamboo_17_tree() -> dict[str, Any]:
    """bamboo-engine's benchmark shape, the same as the engine's `bamboo-17` scenario:

        start -> a1 -> a2 -> subprocess(start -> s1 -> s2 -> end) -> parallel(b1, b2, b3) -> converge
              -> exclusive(c1 | c2: the condition picks c1) -> converge -> end

    The subprocess gets the pipeline's variables through `Params` (its own defaults are overridden).
    """
    from bamboo_engine.builder import (
        ConvergeGateway,
        Data,
        DataInput,
        EmptyEndEvent,
        EmptyStartEvent,
        ExclusiveGateway,
        ParallelGateway,
        Params,
        SubProcess,
        Var,
        build_tree,
    )

    sub_start = EmptyStartEvent()
    sub_start.extend(_noop_rendering_constants()).extend(_noop_rendering_constants()).extend(EmptyEndEvent())
    sub_data = Data()
    passed_down = Params()
    for key in CONSTANTS:
        sub_data.inputs[_variable(key)] = DataInput(type=Var.PLAIN, value="default")
        passed_down.params[_variable(key)] = Var(type=Var.SPLICE, value=_variable(key))
    subprocess = SubProcess(start=sub_start, data=sub_data, params=passed_down)
    # bamboo renders the variable into the text before evaluating it, hence the quotes around it.
    choose = ExclusiveGateway(conditions={0: '"${constant_1}" == "value_1"', 1: '"${constant_1}" != "value_1"'})

    start = EmptyStartEvent()
    (
        start.extend(_noop_rendering_constants())
        .extend(_noop_rendering_constants())
        .extend(subprocess)
        .extend(ParallelGateway())
        .connect(_noop_rendering_constants(), _noop_rendering_constants(), _noop_rendering_constants())
        .converge(ConvergeGateway())
        .extend(choose)
        .connect(_noop_rendering_constants(), _noop_rendering_constants())
        .converge(ConvergeGateway())
        .extend(EmptyEndEvent())
    )
    data = Data()
    for key, value in CONSTANTS.items():
        data.inputs[_variable(key)] = Var(type=Var.PLAIN, value=value)
    return build_tree(start, data=data)


def fanout_tree(branches: int, length: int) -> dict[str, Any]:
    """A parallel gateway of `branches` branches of `length` activities each, converging before the end."""
    from bamboo_engine.builder import ConvergeGateway, EmptyEndEvent, EmptyStartEvent, ParallelGateway, build_tree

    heads = []
    for branch in range(branches):
        head = _noop(branch * length)
        tail = head
        for step in range(1, length):
            tail = tail.extend(_noop(branch * length + step))
        heads.append(head)
    start = EmptyStartEvent()
    start.extend(ParallelGateway()).connect(*heads).converge(ConvergeGateway()).extend(EmptyEndEvent())
    return build_tree(start)


def _service_activity_ids(tree: dict[str, Any]) -> set[str]:
    ids = set()
    for node_id, node in tree["activities"].items():
        if node["type"] == "ServiceActivity":
            ids.add(node_id)
        elif node["type"] == "SubProcess":
            ids |= _service_activity_ids(node["pipeline"])
    return ids


def run_pipelines(trees: list[dict[str, Any]], workers: BambooWorkers, *, tasks_per_pipeline: int) -> RunResult:
    """Starts every tree one after the other, as a bamboo client does, and waits for all of them.

    A run where bamboo ran another number of activities per pipeline than `tasks_per_pipeline` is
    refused, since its time would not be comparable.
    """
    from bamboo_engine import api, states
    from pipeline.eri.models import State
    from pipeline.eri.runtime import BambooDjangoRuntime

    pipeline_ids = [tree["id"] for tree in trees]
    activity_ids = set().union(*(_service_activity_ids(tree) for tree in trees))
    runtime = BambooDjangoRuntime()

    first_start_at = time.time()
    for tree in trees:
        result = api.run_pipeline(runtime=runtime, pipeline=tree)
        if not result.result:
            raise RuntimeError(f"run_pipeline refused pipeline {tree['id']}: {result.message}")
    starts_done_at = time.time()

    def all_finished() -> bool:
        workers.check_alive()
        failed = State.objects.filter(root_id__in=pipeline_ids, name=states.FAILED).values_list("node_id", flat=True)
        if failed:
            raise RuntimeError(f"{len(failed)} node(s) FAILED, e.g. {list(failed)[:3]}: see the worker logs")
        finished = State.objects.filter(node_id__in=pipeline_ids, name=states.FINISHED).count()
        return finished == len(pipeline_ids)

    wait_until(all_finished, timeout=RUN_TIMEOUT, interval=POLL_INTERVAL, what="every pipeline FINISHED")

    rows = list(
        State.objects.filter(root_id__in=pipeline_ids).values(
            "node_id", "root_id", "name", "started_time", "archived_time"
        )
    )
    pipelines = [row for row in rows if row["node_id"] in pipeline_ids]
    activities = [row for row in rows if row["node_id"] in activity_ids]
    unfinished = [row["node_id"] for row in activities if row["name"] != states.FINISHED]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} activities did not finish, e.g. {unfinished[:3]}")
    activities_run = Counter(row["root_id"] for row in activities)
    if set(activities_run.values()) != {tasks_per_pipeline} or len(activities_run) != len(pipeline_ids):
        raise RuntimeError(f"expected {tasks_per_pipeline} activities per pipeline, bamboo ran {activities_run}")
    first_start = datetime.fromtimestamp(first_start_at, UTC)
    last_finish = max(row["archived_time"] for row in pipelines)
    return RunResult(
        wall_s=(last_finish - first_start).total_seconds(),
        tasks=len(activities),
        latencies_ms={
            "per_pipeline": [millis_between(row["started_time"], row["archived_time"]) for row in pipelines],
            "per_node": [millis_between(row["started_time"], row["archived_time"]) for row in activities],
        },
        details={"pipelines": len(pipelines), "start_calls_s": round(starts_done_at - first_start_at, 4)},
    )


SCENARIO_NAMES = ("bamboo-17", "fanout-1000")


def _scenarios(workers: BambooWorkers) -> dict[str, PeerScenario]:
    # Trees are built inside `run`, before its clock starts: a new tree (new ids) for every run.
    return {
        "bamboo-17": PeerScenario(
            "bamboo-17",
            f"{PIPELINES} pipelines of bamboo-engine's benchmark shape (subprocess, parallel and exclusive "
            f"gateways; {BAMBOO_17_ACTIVITIES_RUN} activities run each), started together",
            "per_node",
            lambda: run_pipelines(
                [bamboo_17_tree() for _ in range(PIPELINES)], workers, tasks_per_pipeline=BAMBOO_17_ACTIVITIES_RUN
            ),
        ),
        "fanout-1000": PeerScenario(
            "fanout-1000",
            f"one pipeline: a parallel gateway of {FANOUT_BRANCHES} branches x {BRANCH_LENGTH} noop activities",
            "per_node",
            lambda: run_pipelines(
                [fanout_tree(FANOUT_BRANCHES, BRANCH_LENGTH)],
                workers,
                tasks_per_pipeline=FANOUT_BRANCHES * BRANCH_LENGTH,
            ),
        ),
    }


# -- the command ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bamboo_runner.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIO_NAMES, help="repeatable (default: both)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="runs of each scenario (default 3)")
    parser.add_argument(
        "--db",
        default="sqlite",
        metavar="sqlite|URL",
        help=f"'sqlite' (a new file, default) or a PostgreSQL server URL such as {DEFAULT_POSTGRES}, where a "
        "fresh database is created for the run and dropped after",
    )
    parser.add_argument(
        "--sqlite-journal-mode",
        choices=["wal", "delete"],
        default="wal",
        help="SQLite journal mode (default wal: readers do not block the workers' commits)",
    )
    parser.add_argument("--pool", choices=["prefork", "solo", "threads"], default=DEFAULT_POOL)
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, help="worker processes")
    parser.add_argument(
        "--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY, help="pool size per worker (not for solo)"
    )
    parser.add_argument("--prefetch-multiplier", type=positive_int, default=DEFAULT_PREFETCH)
    return parser.parse_args(argv)


def _flush_broker() -> None:
    import redis

    # The db is the benchmark's alone: leftovers of an interrupted run would be taken as new tasks.
    with redis.Redis.from_url(BROKER_URL) as broker:
        broker.flushdb()


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    names = args.scenario or list(SCENARIO_NAMES)
    began = started_at()
    _flush_broker()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bamboo-bench-") as temp,
            fresh_database(args.db, Path(temp)) as database,
        ):
            progress(f"bamboo-engine on {database.kind}: migrating a fresh database")
            migrate(database, Path(temp))
            if database.kind == "sqlite":
                set_sqlite_journal_mode(database, args.sqlite_journal_mode)
            setup_django(database)
            progress(f"starting {args.workers} bamboo worker(s), pool {args.pool} x {args.concurrency}")
            with running_workers(args, database, Path(temp)) as workers:
                # Untimed: connections, imports and caches warm up before the first measured run.
                run_pipelines([bamboo_17_tree()], workers, tasks_per_pipeline=BAMBOO_17_ACTIVITIES_RUN)
                run_pipelines([fanout_tree(5, 2)], workers, tasks_per_pipeline=10)
                scenarios = _scenarios(workers)
                if database.vacuums_between_runs:
                    progress("autovacuum is off on this PostgreSQL server: VACUUM (ANALYZE) before each measured run")
                reports = {name: measure(scenarios[name], args.repeat, database.vacuum_if_needed) for name in names}
    finally:
        _flush_broker()
    database_info: dict[str, Any] = {"kind": database.kind, "server_version": database.server_version}
    if database.kind == "sqlite":
        database_info["sqlite_journal_mode"] = args.sqlite_journal_mode
    else:
        database_info["autovacuum"] = database.autovacuum
        database_info["vacuumed_before_each_run"] = database.vacuums_between_runs
    return {
        "system": "bamboo-engine",
        "started_at": began,
        "machine": machine_info(PACKAGES),
        "database": database_info,
        "settings": {
            "repeat": args.repeat,
            "pool": args.pool,
            "workers": args.workers,
            "concurrency": 1 if args.pool == "solo" else args.concurrency,
            "prefetch_multiplier": args.prefetch_multiplier,
            "broker": BROKER_URL,
        },
        "scenarios": reports,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
