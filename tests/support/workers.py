"""A worker process for end-to-end tests: `python -m tests.support.workers --target ADDR CODE...`.

Each component appends one JSON line per execution to $WORKER_RECORD_FILE (when set), so tests can count
executions and attempts across processes and kills.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from typing import Any

from worker_sdk import AwaitCallback, Component, Done, PollAgain, TaskContext, Worker, component, current_task


def _record(**extra: Any) -> None:
    path = os.environ.get("WORKER_RECORD_FILE")
    if not path:
        return
    task = current_task()
    line = {
        "pid": os.getpid(),
        "task_id": task.task_id,
        "pipeline_id": task.pipeline_id,
        "node_id": task.node_id,
        "version": task.node_version,
        "attempt": task.attempt,
        **extra,
    }
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(line) + "\n")


@component("echo")
def echo(**inputs: Any) -> dict[str, Any]:
    """Returns its inputs (without the engine's _loop counters) under "echo"."""
    _record()
    return {"echo": {k: v for k, v in inputs.items() if not k.startswith("_")}, "pid": os.getpid()}


@component("emit")
def emit(**inputs: Any) -> dict[str, Any]:
    """Returns its inputs as outputs, plus the loop counters it was given."""
    _record(inputs={k: v for k, v in inputs.items() if not k.startswith("_")})
    outputs = {k: v for k, v in inputs.items() if not k.startswith("_")}
    return {**outputs, "seen_loop": inputs.get("_loop"), "seen_inner_loop": inputs.get("_inner_loop")}


@component("count")
def count(i: int = 0, **inputs: Any) -> dict[str, Any]:
    """Outputs next = i + 1 (drives loops), and echoes `value` when given."""
    _record(i=i, value=inputs.get("value"))
    return {"next": i + 1, "value": inputs.get("value")}


@component("notify_end")
def notify_end(**inputs: Any) -> dict[str, Any]:
    """An executable end event's task."""
    _record()
    return {"notified": True}


@component("failing_end")
def failing_end(**inputs: Any) -> dict[str, Any]:
    _record()
    raise RuntimeError("the end event could not notify")


@component("on_failure")
def on_failure(pipeline_id: str, failed_nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """A pipeline's failure handler: told which nodes failed and why."""
    _record(failed_nodes=failed_nodes)
    return {"alerted": [node["node_id"] for node in failed_nodes]}


@component("add")
def add(a: int, b: int) -> dict[str, Any]:
    _record()
    return {"sum": a + b}


@component("boom")
def boom(message: str = "boom") -> dict[str, Any]:
    _record()
    raise ValueError(message)


@component("sleep")
def sleep(seconds: float = 1.0, first_attempt_only: bool = False) -> dict[str, Any]:
    """Sleeps, watching for cancellation; with first_attempt_only, later attempts return at once."""
    task = current_task()
    _record(event="started")
    if not (first_attempt_only and task.attempt > 1):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if task.is_cancelled():
                _record(event="cancelled")
                task.raise_if_cancelled()
            time.sleep(0.05)
    _record(event="finished")
    return {"slept": seconds, "attempt": task.attempt}


@component("maybe_fail")
def maybe_fail(fail: bool = False, value: Any = None) -> dict[str, Any]:
    """Fails while its input `fail` is true: retried with new inputs, it succeeds."""
    _record(fail=fail)
    if fail:
        raise ValueError(f"asked to fail (value {value!r})")
    return {"value": value}


@component("flaky")
def flaky(succeed_on_retry: int = 2) -> dict[str, Any]:
    """Fails until the node's retry counter reaches `succeed_on_retry` (auto_retry brings it there)."""
    task = current_task()
    _record(retry=task.retry)
    if task.retry < succeed_on_retry:
        raise RuntimeError(f"flaky failure on retry {task.retry}")
    return {"retry": task.retry}


def json_types(value: Any) -> Any:
    """The type of every leaf of a JSON value, in the vocabulary the Node.js worker's node_transform uses."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return [json_types(item) for item in value]
    return {key: json_types(item) for key, item in value.items()}


MADE_IN_PYTHON: dict[str, Any] = {
    "text": "héllo 世界 🚀 from Python",
    "integer": 2**53 - 1,
    "float": 0.1 + 0.2,
    "negative": -42,
    "yes": True,
    "no": False,
    "nothing": None,
    "nested": {"list": [1, "two", 3.5, False, None, {"deep": ["ü"]}], "empty_object": {}, "empty_list": []},
}


@component("py_transform")
def py_transform(value: Any = None, hops: int = 0, trail: list[str] | None = None, **inputs: Any) -> dict[str, Any]:
    """The Python twin of the Node.js worker's node_transform: echoes `value` (and `extra`) with the types
    Python saw, counts hops and extends the trail, for values handed between languages."""
    _record()
    outputs = {
        "echo": value,
        "types": json_types(value),
        "hops": hops + 1,
        "trail": [*(trail or []), "python"],
        "made_in_python": MADE_IN_PYTHON,
    }
    if "extra" in inputs:
        outputs |= {"extra": inputs["extra"], "extra_types": json_types(inputs["extra"])}
    return outputs


class Poller(Component):
    """A polling component: done after `polls` schedule runs."""

    code = "poller"

    def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        _record(kind="execute")
        return PollAgain(after_ms=int(inputs.get("interval_ms", 50)), outputs={"started": True})

    def schedule(self, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        _record(kind="schedule", schedule_times=ctx.schedule_times)
        if ctx.schedule_times >= int(inputs.get("polls", 5)):
            return {"polls": ctx.schedule_times}
        return PollAgain(after_ms=int(inputs.get("interval_ms", 50)))


class CallbackWaiter(Component):
    """Waits for `needed` callbacks; a callback carrying {"fail": ...} fails the node."""

    code = "callback"

    def execute(self, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        _record(kind="execute")
        return AwaitCallback(outputs={"received": []})

    def schedule(self, inputs: dict[str, Any], ctx: TaskContext) -> Any:
        data = ctx.callback_data
        _record(kind="schedule", data=data)
        if isinstance(data, dict) and "fail" in data:
            raise RuntimeError(f"callback reported failure: {data['fail']}")
        received = [*ctx.outputs.get("received", []), data]
        if len(received) >= int(inputs.get("needed", 1)):
            return Done(outputs={"received": received})
        return AwaitCallback(outputs={"received": received})


@component("gc_state")
def gc_state() -> dict[str, Any]:
    """How many objects the worker's process has frozen out of the garbage collector's scans."""
    return {"frozen": gc.get_freeze_count()}


COMPONENTS: dict[str, Any] = {
    c.code: c
    for c in (
        echo,
        gc_state,
        emit,
        count,
        notify_end,
        failing_end,
        on_failure,
        add,
        boom,
        sleep,
        maybe_fail,
        flaky,
        py_transform,
        Poller(),
        CallbackWaiter(),
    )
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("codes", nargs="+", choices=sorted(COMPONENTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = Worker(
        args.target,
        [COMPONENTS[code] for code in args.codes],
        concurrency=args.concurrency,
        poll_wait_ms=5000,
        max_reconnect_backoff=1.0,
    )
    worker.run()


if __name__ == "__main__":
    main()
