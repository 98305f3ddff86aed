"""`python -m bench`: run the benchmark scenarios against a real engine server and real workers.

    python -m bench                                   # the default scenarios, 3 runs, fresh SQLite file
    python -m bench --scenario chain-1000 --repeat 5
    python -m bench --db postgresql://postgres@127.0.0.1:5432/postgres --json result.json
    python -m bench --scenario sustained --repeat 1 --profile bench/profiles   # py-spy on the server

Prints the JSON document on stdout and a summary table on stderr (progress goes there too), so
`python -m bench > result.json` keeps both usable. See bench/README.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.database import Database, fresh_database
from bench.processes import EngineSetup, RunningEngine, running_engine
from bench.procstat import cpu_seconds
from bench.profiling import Profile, profiling
from bench.report import machine_info, scenario_report, summary_table
from bench.runtime import positive_int, progress
from bench.scenarios import DEFAULT_SCENARIOS, SCENARIOS, RunResult, ScenarioContext

# A tiny run of each chosen scenario before measuring, so the first measured run does not pay for
# connection set-up, imports and cold caches.
WARM_UP_SCALE = 0.01
WARM_UP_SECONDS = 1.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="a scenario to run (repeatable; default: " + ", ".join(s.name for s in DEFAULT_SCENARIOS) + ")",
    )
    parser.add_argument("--repeat", type=positive_int, default=3, help="runs of each scenario (default 3)")
    parser.add_argument(
        "--db",
        metavar="URL",
        help="sqlite:////abs/path.db (must not exist yet) or postgresql://user@host:port/db, where a fresh "
        "database is created for the run and dropped after (default: a new SQLite file in a temp dir)",
    )
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")
    parser.add_argument("--concurrency", type=positive_int, default=64, help="tasks in flight per worker (default 64)")
    parser.add_argument(
        "--sqlite-synchronous",
        type=str.upper,
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite commit durability: FULL (durable, default) or NORMAL",
    )
    parser.add_argument(
        "--scale",
        type=_positive_float,
        default=1.0,
        help="multiply every workload size (default 1.0; e.g. 0.05 for a quick smoke run)",
    )
    parser.add_argument(
        "--sustained-seconds",
        type=_positive_float,
        default=30.0,
        help="length of each of the sustained scenario's two phases (default 30)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=_positive_float,
        default=10.0,
        help="how long idle-10k watches the idle engine's CPU (default 10)",
    )
    parser.add_argument(
        "--client-processes",
        type=positive_int,
        help="load-generating client processes of the sustained scenario (default: 1 for the saturated "
        "phase, as many as the half-rate phase's target rate needs)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the engine server with py-spy during the measured runs; write a flame graph, a "
        "speedscope profile and a top-functions summary to DIR",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON document to PATH")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser.parse_args(argv)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def run_scenarios(
    engine: RunningEngine, names: Sequence[str], args: argparse.Namespace, before_each_run: Callable[[], None]
) -> tuple[dict[str, Any], Profile | None]:
    measured = ScenarioContext(
        engine.address,
        args.scale,
        engine.check_alive,
        server_pid=engine.server_pid,
        worker_pids=engine.worker_pids,
        sustained_seconds=args.sustained_seconds,
        idle_seconds=args.idle_seconds,
        client_processes=args.client_processes,
    )
    warm_up = dataclasses.replace(
        measured,
        scale=WARM_UP_SCALE,
        sustained_seconds=min(WARM_UP_SECONDS, args.sustained_seconds),
        idle_seconds=min(WARM_UP_SECONDS, args.idle_seconds),
    )
    for name in names:
        SCENARIOS[name].run(warm_up)
    with profiling(engine.server_pid, args.profile, progress) if args.profile else nullcontext() as profile:
        reports = _measure(measured, names, args, before_each_run)
    return reports, profile


def _measure(
    measured: ScenarioContext, names: Sequence[str], args: argparse.Namespace, before_each_run: Callable[[], None]
) -> dict[str, Any]:
    reports = {}
    for name in names:
        scenario = SCENARIOS[name]
        runs: list[RunResult] = []
        for number in range(1, args.repeat + 1):
            before_each_run()
            cpu_before = cpu_seconds(measured.server_pid) if measured.server_pid else None
            workers_cpu_before = sum(cpu_seconds(pid) for pid in measured.worker_pids)
            result = scenario.run(measured)
            tasks_run = result.tasks_run
            if cpu_before is not None and measured.server_pid and tasks_run:
                # Steadier than wall time on a shared machine; includes the scenario's reads of the results.
                server_cpu_s = cpu_seconds(measured.server_pid) - cpu_before
                result.figures["server_cpu_ms_per_task"] = 1000 * server_cpu_s / tasks_run
            if measured.worker_pids and tasks_run:
                # The workers run on the same cores: what they burn, the server cannot use.
                workers_cpu_s = sum(cpu_seconds(pid) for pid in measured.worker_pids) - workers_cpu_before
                result.figures["workers_cpu_ms_per_task"] = 1000 * workers_cpu_s / tasks_run
            runs.append(result)
            latency = result.to_json()["latency"][scenario.headline_latency]
            progress(
                f"{name} run {number}/{args.repeat}: {result.wall_s:.2f} s, {result.tasks_per_s:.0f} tasks/s, "
                f"{scenario.headline_latency} p50 {latency['p50_ms']:.1f} ms p99 {latency['p99_ms']:.1f} ms"
            )
        reports[name] = scenario_report(scenario, runs)
    return reports


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    names = args.scenario or [scenario.name for scenario in DEFAULT_SCENARIOS]
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="engine-bench-") as temp, fresh_database(args.db, Path(temp)) as database:
        setup = EngineSetup(
            database_url=database.url,
            workers=args.workers,
            concurrency=args.concurrency,
            sqlite_synchronous=args.sqlite_synchronous,
            log_dir=Path(temp),
        )
        progress(f"starting the engine on {database.kind} with {args.workers} worker(s)")
        if database.vacuums_between_runs:
            progress("autovacuum is off on this PostgreSQL server: VACUUM (ANALYZE) before each measured run")
        with running_engine(setup) as engine:
            scenarios, profile = run_scenarios(engine, names, args, database.vacuum_if_needed)
    document = {
        # Peers (a Celery runner, bamboo-engine) will report the same scenarios under their own name.
        "system": "pipeline-engine",
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "database": _database_info(database, args.sqlite_synchronous),
        "settings": {
            "repeat": args.repeat,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "scale": args.scale,
            "sustained_seconds": args.sustained_seconds,
            "idle_seconds": args.idle_seconds,
            "client_processes": args.client_processes,
        },
        "scenarios": scenarios,
    }
    if profile is not None:
        document["profile"] = profile.to_json()
    return document


def _database_info(database: Database, sqlite_synchronous: str) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": database.kind, "server_version": database.server_version}
    if database.kind == "sqlite":
        info["sqlite_synchronous"] = sqlite_synchronous
    else:
        info["autovacuum"] = database.autovacuum
        info["vacuumed_before_each_run"] = database.vacuums_between_runs
    return info


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through every `with`, so the server and workers are stopped and the
    # PostgreSQL database is dropped, as on Ctrl-C.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for scenario in SCENARIOS.values():
            default = "" if scenario in DEFAULT_SCENARIOS else " (only with --scenario)"
            print(f"{scenario.name}: {scenario.description}{default}")
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    began = time.monotonic()
    try:
        document = benchmark(args)
    except KeyboardInterrupt:
        progress("interrupted: the engine and workers were stopped")
        return 130
    text = json.dumps(document, indent=2)
    print(text, flush=True)
    if args.json:
        args.json.write_text(text + "\n")
    progress(f"\n{summary_table(document)}\n(total {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
