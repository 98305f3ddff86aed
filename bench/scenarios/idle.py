"""`idle-10k`: 10,000 pipelines each waiting on a callback node; the engine's cost while they wait,
and the time to call all of them back.

Each pipeline is start -> `await_callback` -> end. The worker answers the node's task with
`AwaitCallback()` (and the output `awaiting_callback: true`), so the node stays RUNNING until a
client calls it back; the callback's schedule run finishes it. Once every node is waiting:

1. the engine server's RSS (`VmRSS`) and CPU (`utime + stime`) over `--idle-seconds` of idling,
   read from /proc: what 10k waiting pipelines cost a server that has nothing to do;
2. every pipeline is called back (the Callback RPCs issued concurrently, each with the node version
   read from GetNodeData, as a client would) and the clock runs until the last one finishes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

from bench.aio_client import AsyncEngineClient, map_concurrently
from bench.procstat import rss_bytes, watch_process
from bench.scenarios.base import (
    RunResult,
    Scenario,
    ScenarioContext,
    require_finished,
    start_together,
    wait_until_settled,
)
from bench.worker import AWAIT_CALLBACK, AWAITING_OUTPUT
from worker_sdk import EmptyEndEvent, EmptyStartEvent, EngineClient, ServiceActivity, build_tree

PIPELINES = 10_000
# Calls in flight at once when reading and calling back 10k pipelines: enough to keep the
# engine busy without queueing thousands of calls in the client.
IN_FLIGHT = 256
MIB = 1024 * 1024


def waiting_tree() -> tuple[str, str]:
    """A tree start -> await_callback -> end as JSON, and the callback node's id."""
    start = EmptyStartEvent()
    waiter = ServiceActivity(component_code=AWAIT_CALLBACK)
    start.extend(waiter).extend(EmptyEndEvent())
    return json.dumps(build_tree(start)), waiter.id


async def _wait_until_waiting(
    context: ScenarioContext, pipeline_ids: Sequence[str], node_ids: Sequence[str]
) -> dict[str, str]:
    """Reads each node's data until every node is RUNNING and waiting; returns their versions by pipeline."""
    versions: dict[str, str] = {}
    deadline = time.monotonic() + context.timeout
    async with AsyncEngineClient(context.address) as client:
        while True:
            pending = [(p, n) for p, n in zip(pipeline_ids, node_ids, strict=True) if p not in versions]
            datas = await map_concurrently(lambda target: client.node_data(*target), pending, IN_FLIGHT)
            for (pipeline_id, _), data in zip(pending, datas, strict=True):
                if data.state == "RUNNING" and data.outputs.get(AWAITING_OUTPUT) is True:
                    versions[pipeline_id] = data.version
            if len(versions) == len(pipeline_ids):
                return versions
            context.check_alive()
            if time.monotonic() > deadline:
                left = len(pipeline_ids) - len(versions)
                raise TimeoutError(f"{left} node(s) still not awaiting a callback after {context.timeout:g} s")
            await asyncio.sleep(0.2)


async def _call_back_all(
    address: str, pipeline_ids: Sequence[str], node_ids: Sequence[str], versions: dict[str, str]
) -> tuple[float, dict[str, float]]:
    """Calls every node back; returns the wall time just before the first call and each call's issue time."""
    issued_at: dict[str, float] = {}
    async with AsyncEngineClient(address) as client:

        async def call_back(target: tuple[str, str]) -> bool:
            pipeline_id, node_id = target
            issued_at[pipeline_id] = time.time()
            return await client.callback(pipeline_id, node_id, versions[pipeline_id], {"from": "bench"})

        first_call_at = time.time()
        await map_concurrently(call_back, list(zip(pipeline_ids, node_ids, strict=True)), IN_FLIGHT)
    return first_call_at, issued_at


def run_idle(context: ScenarioContext) -> RunResult:
    if context.server_pid is None:
        raise RuntimeError("idle-10k reads the engine server's /proc entry: it needs the server's pid")
    count = context.scaled(PIPELINES)
    trees = [waiting_tree() for _ in range(count)]
    rss_before = rss_bytes(context.server_pid)

    trees_json = [tree_json for tree_json, _ in trees]
    first_start_at, starts_done_at, pipeline_ids = start_together(context.address, trees_json)
    node_ids = [node_id for _, node_id in trees]
    versions = asyncio.run(_wait_until_waiting(context, pipeline_ids, node_ids))
    all_waiting_at = time.time()

    idle = watch_process(context.server_pid, context.idle_seconds)

    first_call_at, issued_at = asyncio.run(_call_back_all(context.address, pipeline_ids, node_ids, versions))
    calls_done_at = time.time()
    with EngineClient(context.address) as client:
        # 10k pipelines are 10 pages per look: not too often, so looking does not slow the engine down.
        wait_until_settled(client, pipeline_ids, context, poll_interval=0.5)
        ours = set(pipeline_ids)
        summaries = [p for p in client.list_pipelines(["FINISHED", "FAILED", "REVOKED"], 1000) if p["id"] in ours]
    require_finished([(p["id"], p["state"]) for p in summaries])
    if len(summaries) != count:
        raise RuntimeError(f"started {count} pipelines but found {len(summaries)} of them settled")

    last_finish = max(p["finish_time"] for p in summaries)
    callback_all_s = last_finish.timestamp() - first_call_at
    return RunResult(
        wall_s=callback_all_s,
        tasks=count,
        latencies_ms={
            "callback_to_finish": [(p["finish_time"].timestamp() - issued_at[p["id"]]) * 1000 for p in summaries]
        },
        details={
            "pipelines": count,
            "start_calls_s": round(starts_done_at - first_start_at, 4),
            "until_all_waiting_s": round(all_waiting_at - first_start_at, 4),
            "idle_watched_s": round(idle.wall_s, 3),
            "callback_calls_s": round(calls_done_at - first_call_at, 4),
        },
        figures={
            "idle_rss_mb": idle.peak_rss_bytes / MIB,
            "rss_before_mb": rss_before / MIB,
            "idle_cpu_percent": idle.cpu_percent,
            "callback_all_s": callback_all_s,
        },
    )


IDLE_10K = Scenario(
    name="idle-10k",
    description=f"{PIPELINES} pipelines waiting on a callback node: engine RSS and CPU while idle, "
    "then the time to call them all back",
    headline_latency="callback_to_finish",
    run=run_idle,
)
