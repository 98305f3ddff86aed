"""`fanout-1000`: one pipeline of 1000 activities, 100 parallel branches of 10 in series.

bamboo-engine's second published benchmark shape: the engine has 100 tasks ready at any moment
and must keep every branch moving, and join them all at the converge gateway.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from bench.scenarios.base import RunResult, Scenario, ScenarioContext
from bench.scenarios.together import run_together
from bench.worker import NOOP
from worker_sdk import (
    ConvergeGateway,
    EmptyEndEvent,
    EmptyStartEvent,
    ParallelGateway,
    ServiceActivity,
    Var,
    build_tree,
)

BRANCHES = 100
BRANCH_LENGTH = 10


def fanout_tree(branches: int, length: int) -> dict[str, Any]:
    heads = []
    for branch in range(branches):
        activities = [ServiceActivity(component_code=NOOP) for _ in range(length)]
        for step, activity in enumerate(activities):
            activity.component.inputs.i = Var(type=Var.PLAIN, value=branch * length + step)
        for earlier, later in pairwise(activities):
            earlier.extend(later)
        heads.append(activities[0])
    start = EmptyStartEvent()
    start.extend(ParallelGateway()).connect(*heads).converge(ConvergeGateway()).extend(EmptyEndEvent())
    return build_tree(start)


def run_fanout(context: ScenarioContext) -> RunResult:
    branches = context.scaled(BRANCHES)
    return run_together(context, [fanout_tree(branches, BRANCH_LENGTH)], tasks_per_pipeline=branches * BRANCH_LENGTH)


FANOUT_1000 = Scenario(
    name="fanout-1000",
    description=f"one pipeline: a parallel gateway of {BRANCHES} branches x {BRANCH_LENGTH} serial noop activities",
    headline_latency="per_node",
    run=run_fanout,
)
