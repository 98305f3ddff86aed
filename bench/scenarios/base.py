"""What a scenario is: a name, a description, and a function that runs it once and returns figures.

A scenario gets a `ScenarioContext` (where the engine is, how big to make the workload) and returns a
`RunResult`; the runner repeats it and the report summarises the results. Scenarios only talk to the
engine through its public API (the SDK, or the generated `engine_api` stubs when many calls must be in
flight at once), as a user would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.aio_client import AsyncEngineClient
from bench.results import RunResult, millis_between
from engine_api.engine.v1.engine_pb2 import StartPipelineRequest
from worker_sdk import EngineClient
from worker_sdk.client import start_calls

# States in which a pipeline may still change by itself (FAILED waits for a human: it is settled).
UNSETTLED_STATES = ("RUNNING", "SUSPENDED")


@dataclass(frozen=True)
class ScenarioContext:
    address: str
    scale: float
    """Multiplies the workload size (1.0: the documented size); smoke tests use a small fraction."""
    check_alive: Callable[[], None]
    """Raises if a server or worker process died, so a scenario never waits for a dead engine."""
    timeout: float = 600.0
    server_pid: int | None = None
    """The engine server's process id, for scenarios that read its memory and CPU from /proc."""
    worker_pids: tuple[int, ...] = ()
    """The benchmark's worker processes: their CPU shares the machine's cores with the server."""
    sustained_seconds: float = 30.0
    """How long each phase of the `sustained` scenario lasts."""
    idle_seconds: float = 10.0
    """How long `idle-10k` watches the engine's CPU while every pipeline waits."""
    client_processes: int | None = None
    """Load-generating client processes of `sustained` (None: as many as the target rate needs)."""

    def scaled(self, size: int) -> int:
        return max(1, round(size * self.scale))


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    headline_latency: str
    """Which entry of `RunResult.latencies_ms` the summary table shows."""
    run: Callable[[ScenarioContext], RunResult]


def wait_until_settled(
    client: EngineClient,
    pipeline_ids: Collection[str],
    context: ScenarioContext,
    *,
    poll_interval: float,
) -> None:
    """Waits until none of `pipeline_ids` is RUNNING or SUSPENDED.

    Listing unsettled pipelines is one cheap query however large the pipelines are, unlike reading
    a big state tree; and as figures come from the engine's own timestamps, how often we look
    changes only when the run ends, not what it reports.
    """
    waiting_for = set(pipeline_ids)
    deadline = time.monotonic() + context.timeout
    while True:
        unsettled = {p["id"] for p in client.list_pipelines(UNSETTLED_STATES, page_size=1000)}
        if not waiting_for & unsettled:
            return
        context.check_alive()
        if time.monotonic() > deadline:
            left = len(waiting_for & unsettled)
            raise TimeoutError(f"{left} pipeline(s) still running after {context.timeout:g} s")
        time.sleep(poll_interval)


def require_finished(states: Iterable[tuple[str, str]]) -> None:
    """Raises when a pipeline did not finish: figures of failed runs would look fast and mean nothing."""
    unfinished = [(pipeline_id, state) for pipeline_id, state in states if state != "FINISHED"]
    if unfinished:
        shown = ", ".join(f"{pipeline_id} {state}" for pipeline_id, state in unfinished[:5])
        raise RuntimeError(f"{len(unfinished)} pipeline(s) did not finish: {shown}")


def nodes_by_id(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every node of a state tree by id, the nodes inside subprocesses included."""
    found: dict[str, dict[str, Any]] = {}
    for node_id, node in state["children"].items():
        found[node_id] = node
        if node.get("children"):
            found.update(nodes_by_id(node))
    return found


def activity_run_ms(state: dict[str, Any]) -> list[float]:
    """For every activity that ran: from the engine reaching it (its task is made) to its result committed."""
    return [
        millis_between(node["start_time"], node["finish_time"])
        for node in nodes_by_id(state).values()
        if node["type"] == "ServiceActivity" and node["start_time"] and node["finish_time"]
    ]


def start_together(address: str, trees_json: Sequence[str]) -> tuple[float, float, list[str]]:
    """Starts every tree at once, as a client starting a batch would: StartPipelines calls split as the SDK's
    `start_many` splits them, all in flight together (like Celery's `group(...).apply_async()`, one call for
    the lot). Returns the wall time just before the first call, the wall time when the last one returned,
    and the pipeline ids in the order of `trees_json`."""
    calls = start_calls([StartPipelineRequest(tree_json=tree_json, inputs_json="{}") for tree_json in trees_json])

    async def start_all() -> tuple[float, float, list[str]]:
        async with AsyncEngineClient(address) as client:
            first_start_at = time.time()
            started = await asyncio.gather(*(client.start_many(call) for call in calls))
            return first_start_at, time.time(), [pipeline_id for ids in started for pipeline_id in ids]

    return asyncio.run(start_all())
