"""`chains-100x17`: 100 pipelines of 17 serial activities each, started together.

The Celery peer runs the same work as 100 concurrent canvas chains of 17 tasks: throughput with
many short serial hand-offs in flight at once.
"""

from __future__ import annotations

from bench.scenarios.base import RunResult, Scenario, ScenarioContext
from bench.scenarios.chain import chain_of_noops
from bench.scenarios.together import run_together

PIPELINES = 100
CHAIN_LENGTH = 17


def run_chains(context: ScenarioContext) -> RunResult:
    trees = [chain_of_noops(CHAIN_LENGTH)[0] for _ in range(context.scaled(PIPELINES))]
    return run_together(context, trees, tasks_per_pipeline=CHAIN_LENGTH)


CHAINS_100X17 = Scenario(
    name="chains-100x17",
    description=f"{PIPELINES} pipelines of {CHAIN_LENGTH} serial noop activities, started together",
    headline_latency="per_node",
    run=run_chains,
)
