"""The Celery peer: the engine benchmark's chain scenarios with Celery's own canvas, on the local Redis.

    .venv-peers/bin/python bench/peers/celery_runner.py                       # both scenarios, 3 runs
    .venv-peers/bin/python bench/peers/celery_runner.py --scenario chain-1000 --repeat 1
    .venv-peers/bin/python bench/peers/celery_runner.py --pool prefork --workers 1 --concurrency 2

Starts Celery worker processes, runs each scenario, stops the workers (also on an error or Ctrl-C)
and prints one JSON document on stdout, in the shape of `python -m bench`'s; progress goes to stderr.
Times run from just before the canvas is sent to the last task's `date_done` in the result backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script from .venv-peers: make `bench.*` importable without installing the project.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import redis
from celery import chain, group
from celery.result import AsyncResult, GroupResult

from bench.peers.celery_tasks import QUEUE, REDIS_URL, app, noop
from bench.peers.common import (
    ROOT,
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

CHAINS = 100
CHAIN_LENGTH = 17
LONG_CHAIN_LENGTH = 1000
RESULT_TIMEOUT = 600.0
START_TIMEOUT = 30.0
# How often we look for the results: it changes only when we notice the end, not the figures,
# which come from the result backend's timestamps.
POLL_INTERVAL = 0.1
PACKAGES = ("celery", "kombu", "redis", "billiard")

# The fastest worker set-up measured on the 2-core machine (see bench/peers/README.md): two
# single-process `solo` workers, each taking one message at a time.
DEFAULT_POOL = "solo"
DEFAULT_WORKERS = 2
DEFAULT_CONCURRENCY = 1
DEFAULT_PREFETCH = 1


class CeleryWorkers:
    """The Celery worker processes serving the benchmark queue, and a way to notice one dying."""

    def __init__(self, args: argparse.Namespace, log_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CELERY_BENCH_REDIS_URL": REDIS_URL, "PYTHONUNBUFFERED": "1"}
        self.processes = [
            ChildProcess(f"celery worker {n}", _worker_command(args, n), log_dir / f"worker-{n}.log", cwd=ROOT, env=env)
            for n in range(args.workers)
        ]

    def check_alive(self) -> None:
        check_alive(self.processes)

    def wait_until_ready(self) -> None:
        def all_answer() -> bool:
            self.check_alive()
            return len(app.control.ping(timeout=0.5)) >= len(self.processes)

        wait_until(all_answer, timeout=START_TIMEOUT, interval=0.1, what="every Celery worker answering a ping")


def _worker_command(args: argparse.Namespace, number: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "bench.peers.celery_tasks",
        "worker",
        "--pool",
        args.pool,
        "--hostname",
        f"bench{number}@%h",
        "--queues",
        QUEUE,
        "--loglevel",
        "WARNING",
        "--prefetch-multiplier",
        str(args.prefetch_multiplier),
        # No cluster chatter: it only costs the workers time during the run.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if args.pool != "solo":
        command += ["--concurrency", str(args.concurrency)]
    return command


@contextmanager
def running_workers(args: argparse.Namespace, log_dir: Path) -> Iterator[CeleryWorkers]:
    workers = CeleryWorkers(args, log_dir)
    with ExitStack() as stack:
        # Registered before each start, so a failure or Ctrl-C half-way still stops what did start.
        for process in workers.processes:
            stack.callback(process.stop)
            process.start()
        workers.wait_until_ready()
        yield workers


def _wait_for(result: AsyncResult | GroupResult, workers: CeleryWorkers) -> None:
    deadline = time.monotonic() + RESULT_TIMEOUT
    while not result.ready():
        workers.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the canvas did not finish within {RESULT_TIMEOUT:g} s")
        time.sleep(POLL_INTERVAL)
    # A failed task must fail the run: figures of failed runs would look fast and mean nothing. Checked through
    # each result's state (a plain read of its key), not `result.get()`: that waits on Celery's pub/sub result
    # consumer, which deadlocked here inside redis-py when an AsyncResult was garbage-collected while the
    # consumer unsubscribed (a whole comparison hung on it; see also `_finish_times`).
    results = result.results if isinstance(result, GroupResult) else [result]
    failed = [task for task in results if task.failed()]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} canvas results failed, e.g.:\n{failed[0].traceback}")


def _finish_times(results: Sequence[AsyncResult]) -> list[datetime]:
    """Each task's `date_done`, read straight from the result keys in Redis.

    Not through `AsyncResult.date_done`: that subscribes the result consumer, and an AsyncResult
    garbage-collected while it unsubscribes re-enters redis-py's PubSub and deadlocks (seen here).
    """
    client = redis.Redis.from_url(REDIS_URL)
    try:
        metas = client.mget([f"celery-task-meta-{result.id}" for result in results])
    finally:
        client.close()
    times = []
    for result, meta in zip(results, metas, strict=True):
        done = json.loads(meta).get("date_done") if meta else None
        if not done:
            raise RuntimeError(f"task {result.id} has no date_done in the result backend")
        times.append(datetime.fromisoformat(done).replace(tzinfo=UTC))
    return times


def _chain_results(last: AsyncResult) -> list[AsyncResult]:
    """Every task's result of the chain that ends with `last`, first to last."""
    results: list[AsyncResult] = []
    node: AsyncResult | None = last
    while node is not None:
        results.append(node)
        node = node.parent
    return results[::-1]


def run_chains(workers: CeleryWorkers, chains: int, length: int) -> RunResult:
    """`chains` chains of `length` noop tasks sent as one group."""
    canvas = group(chain(noop.si(i) for i in range(length)) for _ in range(chains))
    sent_at = time.time()
    result = canvas.apply_async()
    _wait_for(result, workers)
    client_wall_s = time.time() - sent_at
    sent = datetime.fromtimestamp(sent_at, UTC)
    # A chain's result is its last task's; the group holds one per chain.
    finishes = [_finish_times(_chain_results(last)) for last in result.results]
    if any(len(chain_finishes) != length for chain_finishes in finishes):
        raise RuntimeError(f"a chain has not {length} results: {[len(f) for f in finishes]}")
    return RunResult(
        wall_s=(max(chain_finishes[-1] for chain_finishes in finishes) - sent).total_seconds(),
        tasks=chains * length,
        latencies_ms={
            # As the engine's `per_node`: one task's finish to the next one's in the same chain.
            "per_node": [millis_between(a, b) for chain_finishes in finishes for a, b in pairwise(chain_finishes)],
            "per_chain": [millis_between(sent, chain_finishes[-1]) for chain_finishes in finishes],
        },
        details={"client_wall_s": round(client_wall_s, 4)},
    )


def run_long_chain(workers: CeleryWorkers, length: int) -> RunResult:
    """One chain of `length` noop tasks: every hop waits for the one before."""
    sent_at = time.time()
    last = chain(noop.si(i) for i in range(length)).apply_async()
    _wait_for(last, workers)
    client_wall_s = time.time() - sent_at
    sent = datetime.fromtimestamp(sent_at, UTC)
    finishes = _finish_times(_chain_results(last))
    if len(finishes) != length:
        raise RuntimeError(f"the chain has {len(finishes)} results, expected {length}")
    return RunResult(
        wall_s=(finishes[-1] - sent).total_seconds(),
        tasks=length,
        latencies_ms={"per_node": [millis_between(a, b) for a, b in pairwise(finishes)]},
        details={"client_wall_s": round(client_wall_s, 4)},
    )


SCENARIO_NAMES = ("chains-100x17", "chain-1000")


def _scenarios(workers: CeleryWorkers) -> dict[str, PeerScenario]:
    return {
        "chains-100x17": PeerScenario(
            "chains-100x17",
            f"a group of {CHAINS} Celery chains of {CHAIN_LENGTH} noop tasks",
            "per_node",
            lambda: run_chains(workers, CHAINS, CHAIN_LENGTH),
        ),
        "chain-1000": PeerScenario(
            "chain-1000",
            f"one Celery chain of {LONG_CHAIN_LENGTH} noop tasks",
            "per_node",
            lambda: run_long_chain(workers, LONG_CHAIN_LENGTH),
        ),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="celery_runner.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIO_NAMES, help="repeatable (default: both)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="runs of each scenario (default 3)")
    parser.add_argument("--pool", choices=["solo", "prefork", "threads"], default=DEFAULT_POOL)
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, help="worker processes")
    parser.add_argument(
        "--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY, help="pool size per worker (not for solo)"
    )
    parser.add_argument("--prefetch-multiplier", type=positive_int, default=DEFAULT_PREFETCH)
    return parser.parse_args(argv)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    names = args.scenario or list(SCENARIO_NAMES)
    began = started_at()
    broker = redis.Redis.from_url(REDIS_URL)
    # The db is ours alone: leftovers of an interrupted run would be taken as new tasks.
    broker.flushdb()
    try:
        with tempfile.TemporaryDirectory(prefix="celery-bench-") as temp:
            progress(f"starting {args.workers} Celery worker(s), pool {args.pool}, on {REDIS_URL}")
            with running_workers(args, Path(temp)) as workers:
                # Untimed: connections, imports and caches warm up before the first measured run.
                run_chains(workers, 10, CHAIN_LENGTH)
                run_long_chain(workers, 50)
                scenarios = _scenarios(workers)
                reports = {name: measure(scenarios[name], args.repeat) for name in names}
        redis_version = broker.info("server")["redis_version"]
    finally:
        broker.flushdb()
        broker.close()
    return {
        "system": "celery",
        "started_at": began,
        "machine": machine_info(PACKAGES),
        "database": {"kind": "none", "broker": "redis", "server_version": redis_version},
        "settings": {
            "repeat": args.repeat,
            "pool": args.pool,
            "workers": args.workers,
            "concurrency": 1 if args.pool == "solo" else args.concurrency,
            "prefetch_multiplier": args.prefetch_multiplier,
        },
        "scenarios": reports,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda: benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
