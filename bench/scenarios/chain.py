"""`chain-1000`: one pipeline of 1000 serial `noop` activities, so every node waits for the one before.

Nothing runs in parallel, so the wall time is the sum of per-node hand-offs: the engine's latency
from a worker reporting one node to the next node's task reaching a worker and being reported.
"""

from __future__ import annotations

import time
from itertools import pairwise
from typing import Any

from bench.scenarios.base import (
    RunResult,
    Scenario,
    ScenarioContext,
    millis_between,
    require_finished,
    wait_until_settled,
)
from bench.worker import NOOP
from worker_sdk import EmptyEndEvent, EmptyStartEvent, EngineClient, ServiceActivity, Var, build_tree

CHAIN_LENGTH = 1000


def chain_of_noops(length: int) -> tuple[dict[str, Any], list[str]]:
    """The tree, and its activity ids in execution order."""
    start = EmptyStartEvent()
    tail: Any = start
    activity_ids: list[str] = []
    for i in range(length):
        activity = ServiceActivity(component_code=NOOP)
        activity.component.inputs.i = Var(type=Var.PLAIN, value=i)
        activity_ids.append(activity.id)
        tail = tail.extend(activity)
    tail.extend(EmptyEndEvent())
    return build_tree(start), activity_ids


def run_chain(context: ScenarioContext) -> RunResult:
    length = context.scaled(CHAIN_LENGTH)
    tree, activity_ids = chain_of_noops(length)
    with EngineClient(context.address) as client:
        started_at = time.time()
        pipeline_id = client.start(tree)
        wait_until_settled(client, [pipeline_id], context, poll_interval=0.05)
        state = client.get_state(pipeline_id)
    require_finished([(pipeline_id, state["state"])])

    nodes = [state["children"][node_id] for node_id in activity_ids]
    # The engine stamps times in ms: the wall clock (same host) from just before our Start call.
    wall_s = state["finish_time"].timestamp() - started_at
    handoff = [millis_between(a["finish_time"], b["start_time"]) for a, b in pairwise(nodes)]
    per_node = [millis_between(a["finish_time"], b["finish_time"]) for a, b in pairwise(nodes)]
    node_run = [millis_between(node["start_time"], node["finish_time"]) for node in nodes]
    return RunResult(
        wall_s=wall_s,
        tasks=length,
        latencies_ms={"per_node": per_node, "handoff": handoff, "node_run": node_run},
        details={"engine_wall_s": round((state["finish_time"] - state["start_time"]).total_seconds(), 4)},
    )


CHAIN_1000 = Scenario(
    name="chain-1000",
    description=f"one pipeline of {CHAIN_LENGTH} serial noop activities",
    headline_latency="per_node",
    run=run_chain,
)
