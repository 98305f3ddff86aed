"""An example worker: serves the `greet` and `shout` components until Ctrl-C / SIGTERM.

python examples/hello_worker.py                 # engine at 127.0.0.1:50051
python examples/hello_worker.py --target host:port
"""

from __future__ import annotations

import argparse
import logging
import time

from worker_sdk import Worker, component, current_task


@component("greet")
def greet(name: str, punctuation: str = "!") -> dict[str, str]:
    """One-shot component: inputs bind by parameter name; the returned dict becomes the node's outputs."""
    task = current_task()
    logging.info("greeting %s (pipeline %s, node %s)", name, task.pipeline_id, task.node_id)
    time.sleep(0.2)  # pretend to work
    return {"message": f"Hello, {name}{punctuation}"}


@component("shout")
def shout(text: str) -> dict[str, str]:
    if not text:
        raise ValueError("nothing to shout")  # becomes FailTask: the node FAILED, ex_data holds this message
    return {"shouted": text.upper()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="engine server address")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Worker(args.target, [greet, shout], concurrency=args.concurrency).run()


if __name__ == "__main__":
    main()
