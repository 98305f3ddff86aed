"""`independent-2000`: 2000 one-activity pipelines started at once from several client threads.

This is throughput under load: Start calls, task dispatch and completions all compete for the
engine at the same time, as when many users start small flows together.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

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

PIPELINES = 2000
CLIENT_THREADS = 8
FINAL_STATES = ["FINISHED", "FAILED", "REVOKED"]


def one_noop_tree_json(i: int) -> str:
    start = EmptyStartEvent()
    activity = ServiceActivity(component_code=NOOP)
    activity.component.inputs.i = Var(type=Var.PLAIN, value=i)
    start.extend(activity).extend(EmptyEndEvent())
    return json.dumps(build_tree(start))


def run_independent(context: ScenarioContext) -> RunResult:
    count = context.scaled(PIPELINES)
    # A new tree per pipeline, as bamboo users build them (fresh ids each time), built and encoded
    # before the clock starts so the client's own work is not measured.
    trees = [one_noop_tree_json(i) for i in range(count)]
    pool = ThreadPoolExecutor(CLIENT_THREADS, thread_name_prefix="bench-start")
    try:
        with EngineClient(context.address) as client:
            first_start_at = time.time()
            pipeline_ids = list(pool.map(client.start, trees))
            starts_done_at = time.time()
            wait_until_settled(client, pipeline_ids, context, poll_interval=0.25)
            ours = set(pipeline_ids)
            summaries = [p for p in client.list_pipelines(FINAL_STATES, page_size=1000) if p["id"] in ours]
    finally:
        # On Ctrl-C or an error, drop the Start calls not yet made instead of waiting for them.
        pool.shutdown(cancel_futures=True)
    require_finished([(p["id"], p["state"]) for p in summaries])
    if len(summaries) != count:
        raise RuntimeError(f"started {count} pipelines but found {len(summaries)} of them settled")

    last_finish = max(p["finish_time"] for p in summaries)
    return RunResult(
        wall_s=last_finish.timestamp() - first_start_at,
        tasks=count,
        latencies_ms={"per_pipeline": [millis_between(p["create_time"], p["finish_time"]) for p in summaries]},
        details={"client_threads": CLIENT_THREADS, "start_calls_s": round(starts_done_at - first_start_at, 4)},
    )


INDEPENDENT_2000 = Scenario(
    name="independent-2000",
    description=f"{PIPELINES} one-activity noop pipelines started together by {CLIENT_THREADS} client threads",
    headline_latency="per_pipeline",
    run=run_independent,
)
