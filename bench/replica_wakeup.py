"""Cross-replica wake-up latency: a task enqueued through replica A, a long poll waiting on replica B.

    python -m bench.replica_wakeup --db postgresql://postgres@127.0.0.1:5432/postgres [--redis redis://...]

Runs two replicas on a fresh PostgreSQL database, once with Redis wake-ups and once relying on the
database re-check alone, and prints JSON plus a table: how long after the Start returned the poll on the
other replica received the task.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bench.database import fresh_database
from bench.stats import latency_summary
from engine_api.engine.v1 import engine_pb2, engine_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.processes import ServerProcess
from tests.trees import chain_tree


def hand_over_ms(poller: ServerProcess, starter: ServerProcess, code: str) -> float:
    received: dict[str, float] = {}

    def poll() -> None:
        with grpc.insecure_channel(poller.address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            request = worker_pb2.PollTasksRequest(worker_id="bench", component_codes=[code], max_tasks=1, wait_ms=15000)
            reply = stub.PollTasks(request, timeout=30)
            received["at"] = time.perf_counter()
            for task in reply.tasks:
                stub.CompleteTask(worker_pb2.CompleteTaskRequest(token=task.token))

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.3)
    with grpc.insecure_channel(starter.address) as channel:
        engine_pb2_grpc.EngineServiceStub(channel).StartPipeline(
            engine_pb2.StartPipelineRequest(tree_json=json.dumps(chain_tree([code])))
        )
        started = time.perf_counter()
    thread.join()
    return (received["at"] - started) * 1000


def measure(db_url: str, folder: Path, label: str, args: list[str], samples: int) -> dict[str, object]:
    servers = []
    for index in range(2):
        log_dir = folder / f"{label}-{index}"
        log_dir.mkdir()
        server = ServerProcess(db_url, log_dir=log_dir, extra_args=args)
        server.start()
        servers.append(server)
    try:
        values = [hand_over_ms(servers[1], servers[0], f"{label}_{i}") for i in range(samples)]
    finally:
        for server in servers:
            server.stop()
    return {"mode": label, "args": args, "hand_over_ms": latency_summary(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="postgresql://... (a fresh database is made and dropped)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        with fresh_database(args.db, folder) as database:
            results = [
                measure(database.url, folder, "redis", ["--redis-url", args.redis], args.samples),
                measure(database.url, folder, "database-recheck", [], args.samples),
            ]
    print(json.dumps({"scenario": "replica-wakeup", "results": results}, indent=2))
    print(f"{'mode':<18} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}", file=sys.stderr)
    for result in results:
        summary = result["hand_over_ms"]
        assert isinstance(summary, dict)
        print(
            f"{result['mode']:<18} {summary['p50_ms']:>8.1f} {summary['p99_ms']:>8.1f} {summary['max_ms']:>8.1f}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
