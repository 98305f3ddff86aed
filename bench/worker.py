"""The benchmark's worker process: `python -m bench.worker --target ADDR --concurrency N`.

It serves two components that do no work at all, so what a scenario measures is the engine's own
overhead: claiming, dispatching, reporting and advancing the pipeline.

* `noop`: one-shot, echoes its input `i`.
* `await_callback`: on execute, waits for a client callback (with the output `awaiting_callback`,
  so a client can see that the node is waiting); the schedule run the callback triggers finishes it.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from worker_sdk import AwaitCallback, Component, Done, TaskContext, Worker, component

NOOP = "noop"
AWAIT_CALLBACK = "await_callback"
AWAITING_OUTPUT = "awaiting_callback"


@component(NOOP)
def noop(i: int = 0) -> dict[str, int]:
    # Echoing the input gives every task a small real output to store, as a real component would.
    return {"i": i}


class AwaitsCallback(Component):
    code = AWAIT_CALLBACK

    def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> AwaitCallback:
        return AwaitCallback(outputs={AWAITING_OUTPUT: True})

    def schedule(self, inputs: dict[str, Any], ctx: TaskContext) -> Done:
        return Done({AWAITING_OUTPUT: False, "callback_data": ctx.callback_data})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("--target", required=True, help="the engine's address, host:port")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks in flight at once")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Worker(args.target, [noop, AwaitsCallback], concurrency=args.concurrency, max_reconnect_backoff=1.0).run()


if __name__ == "__main__":
    main()
