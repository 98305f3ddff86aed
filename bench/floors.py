"""What one chain hop cannot go below on this machine: `python -m bench.floors [--db postgresql://...]`.

A hop of `chain-1000` needs at least one durable commit (the worker's result and the next task) and one
message each way between the engine and a worker. This measures those two alone, with nothing of the
engine around them, so the per-hop figure of `chain-1000` can be read against its floor:

- `sqlite_commit_us`: one small INSERT committed in its own transaction, WAL mode, synchronous=FULL (the
  engine's default durability): mostly the fsync;
- `postgresql_commit_us` (with `--db`): the same on PostgreSQL, over its connection;
- `grpc_stream_round_trip_us`: one small message to a Python `grpc.aio` server in another process and its
  echo back on a bidirectional stream (how TaskStream carries tasks and reports);
- `grpc_unary_round_trip_us`: the same as a unary call (how StartPipeline, PollTasks and CompleteTask go);
- `chain_hop_floor_sqlite_us` (and `_postgresql_us`): that database's commit + the stream round trip;
- `engine_hop_sqlite_us` (and `_postgresql_us`): one hop of a chain through the engine itself, in this
  process with no gRPC and no worker: a waiting poll, the running task's report, and the batch that applies
  it, offers the next task, hands it to the poll and commits. What the engine adds to the commit floor.

Prints JSON on stdout and a short table on stderr, like `python -m bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from bench.database import fresh_database
from bench.processes import free_port
from bench.results import machine_info
from bench.runtime import ChildProcess, positive_int, progress
from bench.scenarios.chain import chain_of_noops
from bench.stats import percentile
from bench.worker import NOOP
from engine_server.core.tree import parse_tree
from engine_server.engine import Engine
from engine_server.settings import Settings
from storage.store import Store

_SERVICE = "floors.Echo"
_MESSAGE = b"x" * 100  # about a small task or report
_WARM_UP = 100


def _summary(samples_s: list[float]) -> dict[str, float]:
    micros = [sample * 1e6 for sample in samples_s]
    return {"p50": round(percentile(micros, 0.5), 1), "p99": round(percentile(micros, 0.99), 1)}


def _timed(step: Callable[[], None], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        step()
        samples.append(time.perf_counter() - began)
    return samples


def sqlite_commits(directory: Path, count: int) -> list[float]:
    connection = sqlite3.connect(directory / "floor.db", isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT)")

        def commit_one() -> None:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO rows (body) VALUES (?)", ("x" * 100,))
            connection.execute("COMMIT")

        _timed(commit_one, _WARM_UP)
        return _timed(commit_one, count)
    finally:
        connection.close()


def postgresql_commits(url: str, count: int) -> list[float]:
    import psycopg  # only with --db: the rest of this module runs without PostgreSQL

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        connection.execute("CREATE TEMPORARY TABLE floor_rows (id SERIAL PRIMARY KEY, body TEXT)")
        connection.commit()

        def commit_one() -> None:
            connection.execute("INSERT INTO floor_rows (body) VALUES (%s)", ("x" * 100,))
            connection.commit()

        _timed(commit_one, _WARM_UP)
        return _timed(commit_one, count)


async def _engine_hops(url: str, count: int) -> list[float]:
    store = Store(url)
    engine = Engine(store, Settings(database_url=url))
    try:
        await engine.start()
    except BaseException:
        store.dispose()
        raise
    try:
        tree, _ = chain_of_noops(_WARM_UP + count + 1)
        await engine.enqueue_start(tree_json=json.dumps(tree), spec=parse_tree(tree), presets={})
        tasks = await engine.poll_tasks("floors", [NOOP], 1, 10_000)
        samples = []
        for number in range(_WARM_UP + count):
            began = time.perf_counter()
            # The poll waits before the report arrives, as a worker's TaskStream does: one batch per hop.
            next_poll = asyncio.ensure_future(engine.poll_tasks("floors", [NOOP], 1, 10_000))
            await asyncio.sleep(0)
            await engine.complete_task(tasks[0].token, {})
            tasks = await next_poll
            if not tasks:
                raise RuntimeError("the engine offered no next task within 10 s")
            if number >= _WARM_UP:
                samples.append(time.perf_counter() - began)
        return samples
    finally:
        await engine.stop()


def engine_hops(url: str | None, directory: Path, count: int) -> list[float]:
    with fresh_database(url, directory) as database:
        return asyncio.run(_engine_hops(database.url, count))


# --- the echo server, run in its own process (`--echo-server PORT`) ---------------------------------


async def _serve_echo(port: int) -> None:
    async def echo_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message

    async def echo_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(echo_stream),
        "Unary": grpc.unary_unary_rpc_method_handler(echo_unary),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


async def _round_trips(address: str, count: int) -> tuple[list[float], list[float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.stream_stream(f"/{_SERVICE}/Stream")()
        stream_samples = []
        for number in range(_WARM_UP + count):
            began = time.perf_counter()
            await call.write(_MESSAGE)
            await call.read()
            if number >= _WARM_UP:
                stream_samples.append(time.perf_counter() - began)
        await call.done_writing()
        unary = channel.unary_unary(f"/{_SERVICE}/Unary")
        unary_samples = []
        for number in range(_WARM_UP + count):
            began = time.perf_counter()
            await unary(_MESSAGE)
            if number >= _WARM_UP:
                unary_samples.append(time.perf_counter() - began)
    return stream_samples, unary_samples


def grpc_round_trips(directory: Path, count: int) -> tuple[list[float], list[float]]:
    port = free_port()
    server = ChildProcess(
        "echo server",
        [sys.executable, "-m", "bench.floors", "--echo-server", str(port)],
        directory / "echo.log",
        cwd=Path(__file__).resolve().parent.parent,
        env={"PATH": "/usr/bin:/bin"},
    )
    server.start()
    try:
        return asyncio.run(_round_trips(f"127.0.0.1:{port}", count))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="", help="also measure a PostgreSQL commit (postgresql://...)")
    parser.add_argument("--count", type=positive_int, default=2000, help="samples per figure")
    parser.add_argument("--echo-server", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(_serve_echo(args.echo_server))
        return

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-floors-") as scratch:
        directory = Path(scratch)
        progress("SQLite commits (WAL, synchronous=FULL)")
        figures["sqlite_commit_us"] = _summary(sqlite_commits(directory, args.count))
        if args.db:
            progress("PostgreSQL commits")
            figures["postgresql_commit_us"] = _summary(postgresql_commits(args.db, args.count))
        progress("engine hops on SQLite (in this process: no gRPC, no worker)")
        figures["engine_hop_sqlite_us"] = _summary(engine_hops(None, directory, args.count))
        if args.db:
            progress("engine hops on PostgreSQL")
            figures["engine_hop_postgresql_us"] = _summary(engine_hops(args.db, directory, args.count))
        progress("gRPC round trips (Python grpc.aio server in another process)")
        stream, unary = grpc_round_trips(directory, args.count)
    figures["grpc_stream_round_trip_us"] = _summary(stream)
    figures["grpc_unary_round_trip_us"] = _summary(unary)
    for database in ("sqlite", "postgresql"):
        if f"{database}_commit_us" in figures:
            floor = figures[f"{database}_commit_us"]["p50"] + figures["grpc_stream_round_trip_us"]["p50"]
            figures[f"chain_hop_floor_{database}_us"] = {"p50": round(floor, 1)}

    print(json.dumps({"machine": machine_info(("grpcio", "psycopg")), "floors": figures}, indent=2))
    width = max(len(name) for name in figures)
    lines = [f"{'floor'.ljust(width)}  p50 us  p99 us"]
    for name, values in figures.items():
        p99 = f"{values['p99']:.0f}" if "p99" in values else "-"
        lines.append(f"{name.ljust(width)}  {values['p50']:6.0f}  {p99:>6}")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
