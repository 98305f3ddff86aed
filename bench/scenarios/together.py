"""Running a batch of pipelines started together, and reading their figures from the engine.

Shared by the scenarios that start pipelines of some shape all at once and wait for the last one
(`bamboo-17`, `fanout-1000`, `chains-100x17`): they differ only in the trees they build.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bench.scenarios.base import (
    RunResult,
    ScenarioContext,
    activity_run_ms,
    millis_between,
    nodes_by_id,
    require_finished,
    start_together,
    wait_until_settled,
)
from worker_sdk import EngineClient


def run_together(
    context: ScenarioContext,
    trees: Sequence[dict[str, Any]],
    *,
    tasks_per_pipeline: int,
    poll_interval: float = 0.05,
) -> RunResult:
    """Starts every tree at once, waits for all, and measures from the first Start to the last finish.

    `tasks_per_pipeline` is how many activities each pipeline runs; a run where the engine ran a
    different number is refused, since its time would not be comparable.
    """
    # Encoded before the clock starts: the client's own work is not measured.
    trees_json = [json.dumps(tree) for tree in trees]
    first_start_at, starts_done_at, pipeline_ids = start_together(context.address, trees_json)
    with EngineClient(context.address) as client:
        wait_until_settled(client, pipeline_ids, context, poll_interval=poll_interval)
        states = [client.get_state(pipeline_id) for pipeline_id in pipeline_ids]
    require_finished([(state["id"], state["state"]) for state in states])

    activities_run = [
        sum(1 for node in nodes_by_id(state).values() if node["type"] == "ServiceActivity") for state in states
    ]
    if set(activities_run) != {tasks_per_pipeline}:
        raise RuntimeError(f"expected {tasks_per_pipeline} activities per pipeline, the engine ran {activities_run}")
    last_finish = max(state["finish_time"] for state in states)
    return RunResult(
        wall_s=last_finish.timestamp() - first_start_at,
        tasks=sum(activities_run),
        latencies_ms={
            "per_node": [ms for state in states for ms in activity_run_ms(state)],
            "per_pipeline": [millis_between(state["start_time"], state["finish_time"]) for state in states],
        },
        details={"pipelines": len(states), "start_calls_s": round(starts_done_at - first_start_at, 4)},
    )
