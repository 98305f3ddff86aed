"""The benchmark's worker process: `python -m bench.worker --target ADDR --concurrency N`.

It serves one component, `noop`, which does no work at all, so what a scenario measures is the
engine's own overhead: claiming, dispatching, reporting and advancing the pipeline.
"""

from __future__ import annotations

import argparse
import logging

from worker_sdk import Worker, component

NOOP = "noop"


@component(NOOP)
def noop(i: int = 0) -> dict[str, int]:
    # Echoing the input gives every task a small real output to store, as a real component would.
    return {"i": i}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("--target", required=True, help="the engine's address, host:port")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks in flight at once")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Worker(args.target, [noop], concurrency=args.concurrency, max_reconnect_backoff=1.0).run()


if __name__ == "__main__":
    main()
